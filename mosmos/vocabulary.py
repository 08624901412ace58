"""The organ vocabulary (``configs/organs.yaml``): canonical names, report synonyms, label spellings.

Every stage loads organs through :func:`load_vocabulary`, so tags, output channels and
label mappings agree on one ordering.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from mosmos.errors import ConfigError
from mosmos.resources import configs_dir

DEFAULT_VOCABULARY = configs_dir() / "organs.yaml"
_NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")
#: Body regions an organ can lie in; a report's catch-all sentences cover only the regions it scans.
REGIONS = ("chest", "abdomen", "pelvis")
_KEYS = ("name", "display", "region", "synonyms", "implied_by", "label_names", "label_parts")


def normalize_label_name(name: str) -> str:
    """Spelling-insensitive key for dataset label names: ``"Kidney (L)"`` -> ``"kidneyl"``."""
    return re.sub(r"[\s_\-().,/]+", "", str(name).lower())


@dataclass(frozen=True)
class Organ:
    """One vocabulary entry (the keys of ``configs/organs.yaml``)."""

    name: str
    display: str
    synonyms: tuple[str, ...] = ()
    label_names: tuple[str, ...] = ()
    region: tuple[str, ...] = REGIONS  # where it lies; every region when the file does not say
    implied_by: tuple[str, ...] = ()  # finding words that locate it ("emphysema": the lungs)
    label_parts: tuple[str, ...] = ()  # dataset labels of its parts, '*' a wildcard; merged into it


@dataclass
class Vocabulary:
    """An ordered list of organs with look-ups by canonical name and by dataset label name."""

    organs: list[Organ]
    source: str = "<memory>"
    _by_name: dict[str, Organ] = field(init=False, repr=False)
    _by_label: dict[str, str] = field(init=False, repr=False)
    _parts: list[tuple[re.Pattern, str]] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._by_name = {}
        self._by_label = {}
        self._parts = []
        for organ in self.organs:
            if organ.name in self._by_name:
                raise ConfigError(f"{self.source}: organ {organ.name!r} is listed twice")
            self._by_name[organ.name] = organ
        for organ in self.organs:
            for spelling in (organ.name, organ.display, *organ.label_names):
                key = normalize_label_name(spelling)
                other = self._by_label.get(key)
                if other is not None and other != organ.name:
                    raise ConfigError(
                        f"{self.source}: label name {spelling!r} maps to both {other!r} and {organ.name!r}"
                    )
                self._by_label[key] = organ.name
        for organ in self.organs:
            for spelling in organ.label_parts:
                key = normalize_label_name(spelling)
                other = self._by_label.get(key.replace("*", ""))
                if other is not None:
                    raise ConfigError(
                        f"{self.source}: label part {spelling!r} of {organ.name!r} is also a label name of {other!r}"
                    )
                pattern = re.compile(".*".join(re.escape(p) for p in key.split("*")))
                self._parts.append((pattern, organ.name))

    @property
    def names(self) -> list[str]:
        return [o.name for o in self.organs]

    def __len__(self) -> int:
        return len(self.organs)

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def __getitem__(self, name: str) -> Organ:
        try:
            return self._by_name[name]
        except KeyError:
            raise KeyError(
                f"unknown organ {name!r}; the vocabulary ({self.source}) has {self.names}"
            ) from None

    def index(self, name: str) -> int:
        return self.names.index(self[name].name)

    def lookup_label(self, label_name: str) -> str | None:
        """Canonical organ name for a dataset's label spelling (the whole organ, else one of its
        ``label_parts``), or ``None`` when it is not known."""
        key = normalize_label_name(label_name)
        return self._by_label.get(key) or self.lookup_part(label_name)

    def lookup_part(self, label_name: str) -> str | None:
        """The organ a label names a part of (``"lung_upper_lobe_right"`` -> ``"lung_right"``), or None."""
        key = normalize_label_name(label_name)
        return next((organ for pattern, organ in self._parts if pattern.fullmatch(key)), None)

    def in_regions(self, name: str, regions: set[str] | frozenset[str]) -> bool:
        """Whether organ ``name`` lies in any of ``regions``."""
        return bool(set(self[name].region) & set(regions))

    def subset(self, names: list[str]) -> Vocabulary:
        """A vocabulary with only ``names``, in the given order."""
        return Vocabulary([self[n] for n in names], source=self.source)

    def to_dict(self) -> dict:
        return {
            "organs": [
                {
                    "name": o.name,
                    "display": o.display,
                    "region": list(o.region),
                    "synonyms": list(o.synonyms),
                    "implied_by": list(o.implied_by),
                    "label_names": list(o.label_names),
                    "label_parts": list(o.label_parts),
                }
                for o in self.organs
            ]
        }

    @classmethod
    def from_dict(cls, data: dict, source: str = "<memory>") -> Vocabulary:
        if not isinstance(data, dict) or not isinstance(data.get("organs"), list) or not data["organs"]:
            raise ConfigError(f"{source}: expected a mapping with a non-empty 'organs' list")
        organs = []
        for i, entry in enumerate(data["organs"]):
            if not isinstance(entry, dict) or "name" not in entry:
                raise ConfigError(f"{source}: organs[{i}] needs at least a 'name'")
            unknown = set(entry) - set(_KEYS)
            if unknown:
                raise ConfigError(
                    f"{source}: organs[{i}] has unknown keys {sorted(unknown)}; valid keys are {', '.join(_KEYS)}"
                )
            name = str(entry["name"])
            if not _NAME_RE.match(name):
                raise ConfigError(f"{source}: organ name {name!r} must be snake_case (e.g. 'kidney_left')")
            for key in ("region", "synonyms", "implied_by", "label_names", "label_parts"):
                if not isinstance(entry.get(key, []), list):
                    raise ConfigError(f"{source}: organs[{i}].{key} must be a list of strings")
            region = tuple(str(r) for r in entry.get("region", REGIONS))
            bad = [r for r in region if r not in REGIONS]
            if bad or not region:
                raise ConfigError(
                    f"{source}: organs[{i}].region={list(region)} must list one or more of {', '.join(REGIONS)}"
                )
            organs.append(
                Organ(
                    name=name,
                    display=str(entry.get("display", name.replace("_", " "))),
                    synonyms=tuple(str(s).lower() for s in entry.get("synonyms", [])),
                    label_names=tuple(str(s) for s in entry.get("label_names", [])),
                    region=region,
                    implied_by=tuple(str(s).lower() for s in entry.get("implied_by", [])),
                    label_parts=tuple(str(s) for s in entry.get("label_parts", [])),
                )
            )
        return cls(organs, source=source)


def load_vocabulary(path: str | Path | None = None, organs: list[str] | None = None) -> Vocabulary:
    """Load a vocabulary YAML (the packaged ``organs.yaml`` when ``path`` is None).

    Args:
        path: a YAML file in the ``configs/organs.yaml`` format.
        organs: optionally keep only these organs, in this order.
    """
    path = Path(path) if path is not None else DEFAULT_VOCABULARY
    if not path.is_file():
        raise ConfigError(f"vocabulary file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    vocab = Vocabulary.from_dict(data, source=str(path))
    return vocab.subset(organs) if organs else vocab

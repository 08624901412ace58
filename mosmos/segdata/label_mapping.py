"""A dataset's label names mapped to vocabulary organs.

An explicit per-dataset ``label_map`` wins; otherwise the vocabulary's label spellings
(``configs/organs.yaml``) decide. A label that maps to nothing, or two labels on one organ, is an
error naming the config key that fixes it, unless the config ignores the label. Labels that the
vocabulary lists as parts of one organ (TotalSegmentator's five lung lobes, its ribs and vertebrae)
merge into that organ.
"""

from __future__ import annotations

import difflib

from mosmos.errors import ConfigError
from mosmos.vocabulary import Vocabulary, normalize_label_name


def _closest_organs(vocab: Vocabulary, text: str, n: int = 3) -> list[str]:
    """Vocabulary organs whose names or spellings look like ``text``."""
    spellings: dict[str, str] = {}
    for organ in vocab.organs:
        for spelling in (organ.name, organ.display, *organ.label_names, *organ.synonyms):
            spellings.setdefault(normalize_label_name(spelling), organ.name)
    matches = difflib.get_close_matches(normalize_label_name(text), list(spellings), n=20, cutoff=0.6)
    out: list[str] = []
    for m in matches:
        if spellings[m] not in out:
            out.append(spellings[m])
    return out[:n]


def _suggest(vocab: Vocabulary, text: str) -> str:
    close = _closest_organs(vocab, text)
    if close:
        return f"closest organs: {', '.join(close)}"
    return f"the vocabulary's organs are: {', '.join(vocab.names)}"


def _resolve_organ(vocab: Vocabulary, spec: str) -> str | None:
    """Canonical organ for a config value: a canonical name, a label spelling or a report synonym."""
    if spec in vocab:
        return spec
    hit = vocab.lookup_label(spec)
    if hit is not None:
        return hit
    phrase = " ".join(spec.lower().split())
    for organ in vocab.organs:
        if phrase in organ.synonyms:
            return organ.name
    return None


def _whole_spellings(vocab: Vocabulary, organ: str) -> set[str]:
    """Normalised spellings that name the whole organ (not one of its parts)."""
    o = vocab[organ]
    return {normalize_label_name(s) for s in (o.name, o.display, *o.label_names)}


def _find_label(labels: dict[int, str], key: str) -> int | None:
    """Label id named ``key``: an exact name, else a unique spelling-insensitive match."""
    exact = [i for i, n in labels.items() if n == key]
    if len(exact) == 1:
        return exact[0]
    loose = [i for i, n in labels.items() if normalize_label_name(n) == normalize_label_name(key)]
    return loose[0] if len(loose) == 1 else None


def map_labels(
    root: str,
    ds_name: str,
    labels: dict[int, str],
    vocab: Vocabulary,
    label_map: dict[str, str] | None,
    ignore: list[str] | None,
) -> tuple[dict[int, str], dict[int, str]]:
    """Map a dataset's foreground labels to vocabulary organs.

    Args:
        root: the dataset's folder or JSON file, named in error messages.
        ds_name: the dataset's name, as its per-dataset config keys spell it.
        labels: label id -> name, background excluded.
        vocab: the organ vocabulary.
        label_map: config ``data.label_map.<ds_name>``: label name -> organ; wins over spellings.
        ignore: config ``data.ignore_labels.<ds_name>``: label names to leave out.

    Returns:
        ``(label id -> organ, ignored label id -> name)``.

    Raises:
        ConfigError: a label that maps to no organ, two labels on one organ, or config keys that name
            no label of the dataset.
    """
    names = [f"{n!r} (id {i})" for i, n in labels.items()]
    explicit: dict[int, str] = {}
    if label_map is not None:
        if not isinstance(label_map, dict):
            raise ConfigError(
                f"data.label_map.{ds_name} must be a mapping {{dataset label name: organ}}, "
                f"got {type(label_map).__name__}"
            )
        for key, spec in label_map.items():
            label_id = _find_label(labels, str(key))
            if label_id is None:
                raise ConfigError(
                    f"data.label_map.{ds_name}: {key!r} is not a label of {root}; "
                    f"its labels are {', '.join(names)}"
                )
            if not isinstance(spec, str) or not spec.strip():
                raise ConfigError(f"data.label_map.{ds_name}.{key} must be an organ name, got {spec!r}")
            organ = _resolve_organ(vocab, spec.strip())
            if organ is None:
                raise ConfigError(
                    f"data.label_map.{ds_name}.{key}: {spec!r} is not an organ of {vocab.source}; "
                    f"{_suggest(vocab, spec)}"
                )
            explicit[label_id] = organ
    ignored: dict[int, str] = {}
    if ignore is not None:
        if isinstance(ignore, str) or not isinstance(ignore, (list, tuple)):
            raise ConfigError(
                f"data.ignore_labels.{ds_name} must be a list of label names, got {type(ignore).__name__}"
            )
        for key in ignore:
            label_id = _find_label(labels, str(key))
            if label_id is None:
                raise ConfigError(
                    f"data.ignore_labels.{ds_name}: {key!r} is not a label of {root}; "
                    f"its labels are {', '.join(names)}"
                )
            if label_id in explicit:
                raise ConfigError(
                    f"{root}: label {labels[label_id]!r} (id {label_id}) is both mapped by "
                    f"data.label_map.{ds_name} and ignored by data.ignore_labels.{ds_name}; keep one"
                )
            ignored[label_id] = labels[label_id]

    mapped: dict[int, str] = {}
    unmapped: list[int] = []
    for label_id, name in labels.items():
        if label_id in ignored:
            continue
        organ = explicit.get(label_id) or vocab.lookup_label(name)
        if organ is None:
            unmapped.append(label_id)
        else:
            mapped[label_id] = organ
    if unmapped:
        first = unmapped[0]
        name = labels[first]
        msg = (
            f"{root}: label {name!r} (id {first}) does not match any organ in {vocab.source}; map it with "
            f"data.label_map.{ds_name}.{name}=<organ> or ignore it with data.ignore_labels.{ds_name}=[{name}]"
            f"; {_suggest(vocab, name)}"
        )
        if len(unmapped) > 1:
            others = ", ".join(f"{labels[i]!r} (id {i})" for i in unmapped[1:])
            msg += f". Also unmapped: {others}"
        raise ConfigError(msg)
    by_organ: dict[str, list[int]] = {}
    for label_id, organ in mapped.items():
        by_organ.setdefault(organ, []).append(label_id)

    def merged_parts(ids: list[int]) -> bool:
        """Several labels on one organ are fine when the vocabulary lists each as a part of it."""
        return all(
            i not in explicit
            and vocab.lookup_part(labels[i]) == mapped[i]
            and normalize_label_name(labels[i]) not in _whole_spellings(vocab, mapped[i])
            for i in ids
        )

    clashes = {o: ids for o, ids in by_organ.items() if len(ids) > 1 and not merged_parts(ids)}
    if clashes:
        organ, ids = next(iter(clashes.items()))
        which = " and ".join(f"{labels[i]!r} (id {i})" for i in ids)
        raise ConfigError(
            f"{root}: labels {which} all map to organ {organ!r}; map all but one elsewhere with "
            f"data.label_map.{ds_name}.<label>=<organ> or ignore them with data.ignore_labels.{ds_name}"
        )
    return mapped, ignored

"""Radiology reports written from a case's ground truth, and the organ tags they imply.

Reports vary the way real ones do: three styles (every organ described; only what matters plus a
catch-all "remaining organs are unremarkable"; only what matters with no catch-all), free-text or
structured ("Liver: ..."), several phrasings per statement, vocabulary synonyms (hepatic, splenic,
renal, gall bladder, biliary, IVC) and negations ("No focal hepatic lesion."). They are written so
the tag contract of :func:`findings_to_tags` is exactly recoverable by a sentence-level parser:

* each sentence names one organ, or coordinates organs that are all normal;
* out-of-view sentences say "not included in / outside the field of view" or "not imaged";
* absence sentences say "absent", "not seen", "removed" or "status post ...ectomy";
* abnormal sentences carry no negation word; normal ones mention a finding only negated;
* the catch-all ("remaining", "otherwise", "other") appears only when every organ it covers is
  normal, and no other sentence uses those words.
"""

from __future__ import annotations

import numpy as np

from mosmos.synth.report_phrases import (
    ABSENT,
    CATCH_ALL,
    EXTRAS,
    LIVER_DOME,
    NAMES,
    NO_ACUTE,
    NORMAL,
    OUT_OF_VIEW,
    PAIRS,
    PROCEDURE,
    STRUCTURED_ABSENT,
    STRUCTURED_NORMAL,
    STRUCTURED_OUT_OF_VIEW,
    STYLES,
    abnormal_sentences,
    cap,
    pick,
    side_of,
)


def _finding_info(record: dict) -> dict[tuple[str, str], dict]:
    """Size, count and location of each (organ, finding) for the report text."""
    info: dict[tuple[str, str], dict] = {}
    fatty = "fatty_liver" in record["organs"].get("liver", {}).get("findings", [])
    for les in record.get("lesions", []):
        entry = info.setdefault((les["organ"], les["finding"]), {"n": 0, "size_cm": 0.0})
        entry["n"] += 1
        if les.get("size_cm", 0.0) >= entry["size_cm"]:
            entry["size_cm"] = les.get("size_cm", 0.0)
            if "lobe" in les:
                entry["lobe"] = f"{les['lobe']} hepatic lobe"
            if "pole" in les:
                entry["pole"] = les["pole"]
        if les["finding"] == "liver_lesion":
            entry["fatty"] = fatty
            entry["n"] = min(entry["n"], 3)
    for organ, details in record.get("details", {}).items():
        for finding, values in details.items():
            info.setdefault((organ, finding), {}).update(values)
    return info


def _organ_sentences(
    organ: str, entry: dict, info: dict, structured: bool, rng: np.random.Generator
) -> tuple[list[str], list[str]]:
    """Findings sentences and impression sentences for one organ."""
    name, head = NAMES[organ]
    status, fmt = entry["status"], {"side": side_of(organ), "name": name, "head": head}
    kind = "kidney" if organ.startswith("kidney") else organ
    if status == "out_of_view":
        if structured:
            return [pick(rng, STRUCTURED_OUT_OF_VIEW).format(**fmt)], []
        options = [*OUT_OF_VIEW, LIVER_DOME] if organ == "liver" else OUT_OF_VIEW
        return [cap(pick(rng, options).format(**fmt))], []
    if status == "absent":
        impression = [cap(pick(rng, ABSENT[kind]).format(**fmt))] if rng.random() < 0.4 else []
        if structured:
            return [pick(rng, STRUCTURED_ABSENT).format(procedure=PROCEDURE[organ], **fmt)], impression
        return [cap(pick(rng, ABSENT[kind]).format(**fmt))], impression
    if status == "normal":
        if structured:
            return [pick(rng, STRUCTURED_NORMAL).format(**fmt)], []
        return [cap(pick(rng, NORMAL[kind]).format(**fmt))], []
    text, impression = [], []
    for finding in entry["findings"]:
        sentence, imp = abnormal_sentences(organ, finding, info.get((organ, finding), {}), rng)
        text.append(sentence)
        impression.append(imp)
    if structured:
        text[0] = f"{head}: {text[0]}"
    return text, impression


def write_report(record: dict, rng: np.random.Generator) -> tuple[str, str, dict]:
    """Findings and impression text for a case, and what the report mentions.

    Returns ``(findings_en, impressions_en, meta)`` with ``meta = {"style", "structured",
    "catch_all", "mentioned"}``; ``meta`` is what :func:`findings_to_tags` needs.
    """
    organs = {o: e for o, e in record["organs"].items() if o in NAMES}
    styles = list(STYLES)
    style = str(rng.choice(styles, p=[STYLES[s] for s in styles]))
    structured = style == "complete" and rng.random() < 0.3
    # Brief styles still name every organ that is not normal; of the normal ones, only some.
    mentioned = [
        o for o in organs if organs[o]["status"] != "normal" or style == "complete" or rng.random() < 0.25
    ]
    if style == "complete" and not structured and rng.random() < 0.5:  # structured keeps its order
        mentioned = [mentioned[i] for i in rng.permutation(len(mentioned))]
    info = _finding_info(record)
    blocks: list[list[str]] = []
    impression: list[str] = []
    done: set[str] = set()
    for organ in mentioned:
        if organ in done:
            continue
        pair = next(
            (p for p in PAIRS if organ in p and all(organs.get(o, {}).get("status") == "normal" for o in p)),
            None,
        )
        if (
            pair
            and not structured
            and all(o in mentioned and o not in done for o in pair)
            and rng.random() < 0.35
        ):
            blocks.append([pick(rng, PAIRS[pair])])
            done.update(pair)
            continue
        text, imp = _organ_sentences(organ, organs[organ], info, structured, rng)
        blocks.append(text)
        impression.extend(imp)
        done.add(organ)
    for extra in rng.permutation(len(EXTRAS))[: int(rng.integers(0, 3))]:
        blocks.insert(int(rng.integers(len(blocks) + 1)), [EXTRAS[int(extra)]])
    catch_all = style == "focused"
    if catch_all:
        blocks.append([pick(rng, CATCH_ALL)])
    if not blocks:
        blocks.append([pick(rng, EXTRAS)])
    findings_text = " ".join(s for block in blocks for s in block)
    if impression:
        order = rng.permutation(len(impression))
        impression_text = " ".join(impression[i] for i in order)
    else:
        impression_text = pick(rng, NO_ACUTE)
    meta = {"style": style, "structured": structured, "catch_all": catch_all, "mentioned": sorted(done)}
    return findings_text, impression_text, meta


def findings_to_tags(case: dict) -> dict[str, tuple[int, int]]:
    """Expected report tags ``organ -> (present, abnormal)`` for one ``findings.json`` entry.

    ``present`` and ``abnormal`` are 1, 0 or -1 (unknown): out of view (-1, -1); absent (0, -1);
    normal (1, 0); abnormal (1, 1). An organ the report does not mention is (1, 0) when the
    report has a catch-all sentence and (-1, -1) otherwise. A case without a ``report`` entry
    (segmentation cases) is treated as a report that mentions every organ.
    """
    report = case.get("report")
    mentioned = set(report["mentioned"]) if report else None
    catch_all = bool(report and report.get("catch_all"))
    tags: dict[str, tuple[int, int]] = {}
    for organ, entry in case["organs"].items():
        status = entry["status"]
        if mentioned is not None and organ not in mentioned:
            tags[organ] = (1, 0) if catch_all else (-1, -1)
        elif status == "out_of_view":
            tags[organ] = (-1, -1)
        elif status == "absent":
            tags[organ] = (0, -1)
        elif status == "abnormal":
            tags[organ] = (1, 1)
        else:
            tags[organ] = (1, 0)
    return tags

"""Evaluation protocols that test what a detector never saw in training.

* ``leave-one-method-out``: for each morph method of the data, train without its morphs
  (``exclude_methods``: gone from train and dev) and test on the whole test split; the
  held-out method's row is the figure that matters. With several ``attacks`` modes it
  tabulates given vs synthetic vs both on methods never seen.
* ``cross-dataset``: train on data A (``--data``), test on all of data B (``--test_data``,
  every split), with the threshold and the shortcut thresholds from A's dev split.

Every table names the protocol, what was never seen in training, and carries the shortcut
rows (:mod:`.shortcuts`) scored on the same test images, beside per-method D-EER, AUC and
BPCER@APCER.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

from ..attacks.sets import check_attack_config, made_sources, uses_given
from ..evaluation.report import APCER_TARGETS, figure_text, interval_text, write_json
from ..io.config import Config, apply_overrides
from ..io.errors import MadlabError
from ..io.files import write_text_atomically
from . import app

__all__ = ["PROTOCOLS", "ProtocolRow", "format_protocol", "format_unseen", "run_protocol"]

PROTOCOLS = ("leave-one-method-out", "cross-dataset")
ProtocolRow = dict[str, Any]
COLUMNS = ["protocol", "attacks", "trained_on", "schedule", "never_seen", "subset", "seen_in_training", "n_bona_fide",
           "n_morph", "d_eer", "auc", *APCER_TARGETS, "auc_low", "auc_high", "too_small"]


def _rows(report: dict[str, Any], base: ProtocolRow, seen: set[str]) -> list[ProtocolRow]:
    """One row per method, overall, and each shortcut statistic (overall), from an ISO report."""
    def row(subset: str, m: dict[str, Any], seen_flag: str) -> ProtocolRow:
        bounds = m.get("intervals", {}).get("auc") or [None, None]
        return {**base, "subset": subset, "seen_in_training": seen_flag, "n_bona_fide": m["n_bona_fide"],
                "n_morph": m["n_morph"], "d_eer": m["d_eer"], "auc": m["auc"],
                **{k: m[k]["bpcer"] for k in APCER_TARGETS}, "auc_low": bounds[0], "auc_high": bounds[1],
                "too_small": ";".join(m.get("flags", {}))}

    rows = [row(name, m, "yes" if name in seen else "NO") for name, m in report["per_method"].items()]
    rows.append(row("overall", report["overall"], ""))
    for name, shortcut in report.get("shortcuts", {}).items():
        rows.append(row(f"shortcut:{name}", shortcut["overall"], ""))
        for method, m in shortcut["per_method"].items():
            if method not in seen:
                rows.append(row(f"shortcut:{name}:{method}", m, "NO"))
    return rows


def format_protocol(rows: list[ProtocolRow]) -> str:
    """The protocol table for the terminal; a header line per training run names what it never saw."""
    head = (f"{'subset':<28}{'seen':>5}{'BF':>5}{'M':>5}{'D-EER':>8}{'AUC':>7}{'AUC 95%':>13}{'BPCER@1%':>10}"
            f"{'@5%':>7}{'@10%':>7}")
    lines, current = [], None
    for r in rows:
        key = (r["protocol"], r["attacks"], r["trained_on"], r["never_seen"])
        if key != current:
            current = key
            schedule = f", {r['schedule']}" if r.get("schedule") else ""
            lines += ["", f"protocol {r['protocol']}: attacks={r['attacks']}, trained on {r['trained_on']}{schedule};"
                          f" never seen in training: {r['never_seen']}", head, "-" * len(head)]
        lines.append(f"{r['subset']:<28}{r['seen_in_training']:>5}{r['n_bona_fide']:>5}{r['n_morph']:>5}"
                     + "".join(_cell(r, k, w) for k, w in (("d_eer", 8), ("auc", 7)))
                     + _span(r, 13) + "".join(_cell(r, k, w) for k, w in zip(APCER_TARGETS, (10, 7, 7))))
    lines.append("seen = whether that method's morphs were in the training split; shortcut rows score the same"
                 " test images by one image statistic (threshold on the training data's dev split); AUC 95% ="
                 " bootstrap interval (metrics.json of each run); -- = too few test images for that figure")
    return "\n".join(lines[1:])


def format_unseen(rows: list[ProtocolRow]) -> str:
    """The summary that matters: for each ``attacks`` mode, the detector on every method it never saw."""
    unseen = [r for r in rows if r["seen_in_training"] == "NO" and not r["subset"].startswith("shortcut:")]
    head = f"{'attacks':<11}{'never seen':<24}{'BF':>5}{'M':>5}{'D-EER':>8}{'AUC':>7}{'AUC 95%':>13}{'BPCER@10%':>11}"
    lines = ["detector on methods never seen in training:", head, "-" * len(head)]
    lines += [f"{r['attacks']:<11}{r['subset']:<24}{r['n_bona_fide']:>5}{r['n_morph']:>5}{_cell(r, 'd_eer', 8)}"
              f"{_cell(r, 'auc', 7)}{_span(r, 13)}{_cell(r, 'bpcer@apcer=10%', 11)}" for r in unseen]
    return "\n".join(lines)


def _cell(r: ProtocolRow, key: str, width: int) -> str:
    return figure_text(key, r[key], key in (r.get("too_small") or "").split(";")).rjust(width)


def _span(r: ProtocolRow, width: int) -> str:
    bounds = None if r.get("auc_low") is None else (r["auc_low"], r["auc_high"])
    return interval_text("auc", bounds, "auc" in (r.get("too_small") or "").split(";")).rjust(width)


def _write_csv(path: Path, rows: list[ProtocolRow]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomically(path, buffer.getvalue())


def _training_methods(config: Config, env: app.Env) -> list[str]:
    samples = app.run_data(config, env)
    return sorted({s.method for s in samples if s.label == 1 and s.split == "train"})


def _seen(config: Config, methods: list[str]) -> set[str]:
    if not uses_given(config.attacks):
        return set()
    return set(methods) - set(config.exclude_methods)


def _trained_on(a_name: str, seen: set[str], mode: str) -> str:
    """What a run trained on: the given methods it saw, or the kinds of attack it made alone."""
    made = " and ".join(made_sources(mode))
    return f"{a_name} ({', '.join(sorted(seen)) or f'bona fides + {made} attacks only'})"


def run_protocol(kind: str, config: Config, overrides: list[str], env: app.Env, out: Path, attack_modes: list[str],
                 test_data: str | None = None, overwrite: bool = False) -> list[ProtocolRow]:
    """Run a protocol end to end (train, test, tabulate) and write ``protocol.{json,csv}`` into ``out``.

    Args:
        kind: One of :data:`PROTOCOLS`.
        config: The run's configuration (data A, backbone, ...), overrides applied.
        overrides: The user's ``--override`` items, applied to every training run.
        attack_modes: The ``attacks`` settings to train with, one training run each (per held-out method).
        test_data: Data set B for ``cross-dataset``.

    Raises:
        MadlabError: For an unknown protocol, a missing ``test_data``, or data with under two methods
            for leave-one-method-out.
    """
    if kind not in PROTOCOLS:
        raise MadlabError(f"protocol {kind!r} is not one of {PROTOCOLS}")
    if kind == "cross-dataset" and not test_data:
        raise MadlabError("the cross-dataset protocol needs --test_data (the data set B to test on, all of it)")
    for mode in attack_modes:  # a key one mode refuses stops the protocol before any data is loaded or run trained
        check_attack_config(apply_overrides(config, [*overrides, f"attacks={mode}"]))
    quiet = app.Env(cache_dir=env.cache_dir, progress=False, say=lambda _: None)
    methods = _training_methods(config, quiet)
    rows: list[ProtocolRow] = []
    a_name = config.data or f"embedded {config.embedded_data}"
    plans = []
    for mode in attack_modes:
        if kind == "leave-one-method-out" and not uses_given(mode):
            # Training on made attacks alone sees no given morph: one run, with every method kept out of dev
            # too, so no given morph chooses its checkpoint or threshold either.
            plans.append((mode, methods))
        elif kind == "leave-one-method-out":
            if len(methods) < 2:
                raise MadlabError(f"leave-one-method-out needs at least two morph methods in the training data,"
                                  f" found {methods}")
            plans += [(mode, [m]) for m in methods]
        else:
            plans.append((mode, []))
    for mode, held_out in plans:
        name = f"{mode}" + (f"-without-{'-'.join(held_out)}" if held_out else "")
        sub = out / name
        items = [*overrides, f"attacks={mode}", f"exclude_methods={','.join(held_out)}", f"output_dir={sub}"]
        run_config = apply_overrides(config, items)
        env.say(f"--- protocol {kind}: attacks={mode}" + (f", without {', '.join(held_out)}" if held_out else ""))
        app.run_train(run_config, quiet, overwrite=overwrite)
        model_path = sub / "morph_detector.safetensors"
        seen = _seen(run_config, methods)
        if kind == "leave-one-method-out":
            report = app.run_test(model_path, [], quiet, str(sub))
            never = ", ".join(sorted(set(methods) - seen)) or "-"
            trained_on = _trained_on(a_name, seen, mode)
        else:
            report = _cross_test(model_path, test_data or "", sub, quiet)
            # A method of B with the name of one trained on A counts as seen (made by the same
            # tool, on other people and photos); the images themselves are all unseen.
            b_methods = set(report["per_method"])
            never = (f"every image of {test_data} (another data set); methods: "
                     + (", ".join(sorted(b_methods - seen)) or "none unseen by name"))
            trained_on = _trained_on(a_name, seen, mode)
        # Modes differ in their default schedule, so each run names its own.
        base = {"protocol": kind, "attacks": mode, "trained_on": trained_on, "schedule": run_config.schedule,
                "never_seen": never}
        rows += _rows(report, base, seen)
    write_json(out / "protocol.json", rows)
    _write_csv(out / "protocol.csv", rows)
    env.say(format_protocol(rows))
    env.say(format_unseen(rows))
    return rows


def _cross_test(model_path: Path, test_data: str, out: Path, env: app.Env) -> dict[str, Any]:
    """Score all of ``test_data`` with the model, through ``test --data B --split all`` (the one
    :class:`~.detector.Detector` path): the threshold and the shortcut thresholds are those the model
    file recorded from data A's dev split. Writes the test report into ``out`` and returns it.
    """
    return app.run_test(model_path, [f"data={test_data}"], env, str(out), split="all")

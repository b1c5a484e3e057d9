"""The faithfulness comparisons of BENCHMARKS.md under the issue-24 protocol, from the files a job wrote.

    .venv/bin/python bench/faithfulness_protocol.py runs/quick        # a folder with faithfulness_combined*.csv

It computes nothing new: it reads faithfulness_combined.csv (means), faithfulness_combined_tests.csv
(the paired, Holm-corrected tests of the gaps) and prints Markdown: the table of the main grid, the
AttnLRP comparisons of every reading against transformer attribution, rollout and Grad-CAM, and the
grid-sensitivity table (each map set's gaps and rank on every grid that was scored).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from xtl.faithfulness import markdown_table  # noqa: E402
from xtl.faithfulness.results import read_rows, read_tests  # noqa: E402


def main(folder: Path) -> None:
    rows = read_rows(folder / "faithfulness_combined.csv")
    tests = read_tests(folder / "faithfulness_combined_tests.csv")
    main_grid = str(rows[0]["grid"])
    print(f"## Main grid ({main_grid}), every baseline\n")
    print(markdown_table([r for r in rows if str(r["grid"]) == main_grid]))
    print(f"\n## Paired tests of AttnLRP (family of {int(tests[0]['family'])} comparisons, Holm)\n")
    print("| baseline | gap | AttnLRP reading | against | mean [95 % CI] | p | p (Holm) | verdict |")
    print("|---|---|---|---|---|---|---|---|")
    for t in tests:
        if {t["first_method"], t["second_method"]} & {"attnlrp"} and t["kind"] == "method" or (
                t["first_method"] == "attnlrp" and t["kind"] == "reference"):
            first, second, sign = (t["first"], t["second"], 1) if t["first_method"] == "attnlrp" else (
                t["second"], t["first"], -1)
            low, high = (t["low"], t["high"]) if sign > 0 else (-t["high"], -t["low"])
            verdict = {"first": first, "second": second}.get(t["verdict"], t["verdict"]) if sign > 0 else {
                "first": second, "second": first}.get(t["verdict"], t["verdict"])
            print(f"| {t['baseline']} | {t['measure']} | {first} | {second} | {sign * t['mean']:+.3f} "
                  f"[{low:+.3f}, {high:+.3f}] | {t['p']:.4f} | {t['p_holm']:.4f} | {verdict} |")
    grids = list(dict.fromkeys(str(r["grid"]) for r in rows))
    if len(grids) > 1:
        baseline = rows[0]["baseline"]
        print(f"\n## Grid sensitivity (baseline {baseline}): SRG prob / SRG acc (rank within the model)\n")
        print("| model | map set | " + " | ".join(f"grid {g}" for g in grids) + " |")
        print("|---|---|" + "---|" * len(grids))
        chosen = [r for r in rows if r["baseline"] == baseline]
        for model in dict.fromkeys(r["model"] for r in chosen):
            labels = list(dict.fromkeys(r["label"] for r in chosen if r["model"] == model))
            rank = {}
            for g in grids:
                for measure in ("srg", "srg_accuracy"):
                    ordered = sorted((r for r in chosen if r["model"] == model and str(r["grid"]) == g),
                                     key=lambda r: -r[measure])
                    rank.update({(r["label"], g, measure): k for k, r in enumerate(ordered, start=1)})
            for label in labels:
                cells = []
                for g in grids:
                    r = next((r for r in chosen if r["model"] == model and r["label"] == label and str(r["grid"]) == g),
                             None)
                    cells.append("-" if r is None else f"{r['srg']:+.3f} (#{rank[(label, g, 'srg')]}) / "
                                 f"{r['srg_accuracy']:+.3f} (#{rank[(label, g, 'srg_accuracy')]})")
                print(f"| {model} | {label} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/quick"))

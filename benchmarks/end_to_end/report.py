"""The training-step table throughput.py prints, and the ratios against the official variant."""

from __future__ import annotations

from typing import Any


def check_text(check: dict[str, Any] | None) -> str:
    if check is None:
        return "-"
    if check["max_rel_diff"] is None:
        return "FAIL (non-finite loss)"
    verdict = "pass" if check["passed"] else "FAIL"
    return f"{verdict} ({check['max_rel_diff']:.1e} vs rtol {check['rtol']:.0e})"


def format_table(results: list[dict[str, Any]]) -> str:
    head = (
        f"{'variant':<22} {'prec':<5} {'im/s':>9} {'ms/step':>9} {'vs official':>11} "
        f"{'peak GiB':>9} {'MFU':>6}  check (max rel. loss diff)"
    )
    lines = [head, "-" * len(head)]
    for r in results:
        if r["status"] == "skipped":
            lines.append(f"{r['name']:<22} skipped: {r['reason']}")
            continue
        check_txt = check_text(r.get("check"))
        if r["status"] != "ok":
            lines.append(f"{r['name']:<22} {r.get('precision', '-'):<5} FAILED: {r['error']}  [{check_txt}]")
            continue
        ratio = f"{r['ratio_vs_official']:.2f}x" if r.get("ratio_vs_official") else "-"
        peak = f"{r['peak_gib']:.1f}" if r["peak_gib"] is not None else "-"
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
        lines.append(
            f"{r['name']:<22} {r['precision']:<5} {r['images_per_s']:9.1f} {r['ms_per_step']:9.2f} "
            f"{ratio:>11} {peak:>9} {mfu:>6}  {check_txt}"
        )
    return "\n".join(lines)


def status_line(result: dict[str, Any]) -> str:
    """One variant's outcome as the run prints it when the variant is done."""
    if result["status"] == "ok":
        return f"{result['images_per_s']:.1f} im/s"
    if result["status"] == "skipped":
        return f"skipped: {result['reason']}"
    return f"FAILED: {result['error']}"


def add_ratios(results: list[dict[str, Any]]) -> None:
    official = next((r for r in results if r["name"] == "official" and r["status"] == "ok"), None)
    for r in results:
        if r["status"] == "ok" and official is not None:
            r["ratio_vs_official"] = r["images_per_s"] / official["images_per_s"]

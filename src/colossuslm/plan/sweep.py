"""Scaling curves: the best layout at each cluster size, as a table and (optionally) a plot."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from colossuslm.errors import ColossusError
from colossuslm.plan.layout import Software
from colossuslm.plan.planner import Plan, make_plan
from colossuslm.plan.units import money, si

ELLIPSIS_FACTOR = 4  # "1024,...,1000000" fills in x4 steps


@dataclass(frozen=True)
class SweepPoint:
    n_gpus: int
    plan: Plan

    @property
    def fits(self) -> bool:
        return self.plan.projection is not None


def parse_sweep(text: str) -> list[int]:
    """`gpus=1024,4096,...,1000000` -> GPU counts; `...` fills geometric x4 steps between neighbours."""
    key, _, values = text.partition("=")
    if key.strip() != "gpus" or not values:
        raise ColossusError(f"--sweep {text!r}: expected gpus=N1,N2,... (e.g. gpus=1024,...,1000000)")
    items = [v.strip() for v in values.split(",") if v.strip()]
    counts: list[int] = []
    for i, item in enumerate(items):
        if item == "...":
            if not counts or i + 1 >= len(items) or items[i + 1] == "...":
                raise ColossusError(f"--sweep {text!r}: '...' needs a number on each side")
            continue
        try:
            n = int(float(item))
        except ValueError:
            raise ColossusError(f"--sweep {text!r}: {item!r} is not a GPU count") from None
        if n <= 0:
            raise ColossusError(f"--sweep {text!r}: GPU counts must be > 0")
        if i > 0 and items[i - 1] == "...":
            step = counts[-1] * ELLIPSIS_FACTOR
            while step < n:
                counts.append(step)
                step *= ELLIPSIS_FACTOR
        counts.append(n)
    return sorted(set(counts))


def run_sweep(
    model: str,
    cluster: str,
    counts: list[int],
    tokens: float,
    seq_len: int | None = None,
    batch_tokens: float | None = None,
    software: Software = Software(),
    fixed: dict | None = None,
    hardware_file: str | None = None,
) -> list[SweepPoint]:
    return [
        SweepPoint(
            n,
            make_plan(
                model,
                cluster,
                tokens,
                gpus=n,
                seq_len=seq_len,
                batch_tokens=batch_tokens,
                software=software,
                fixed=fixed,
                hardware_file=hardware_file,
                top=1,
            ),
        )
        for n in counts
    ]


def sweep_rows(points: list[SweepPoint]) -> list[str]:
    head = (
        f"{'GPUs':>9}  {'best layout':<28} {'tokens/s':>9} {'MFU':>6} {'days':>8} {'goodput':>8} {'cost':>10} {'MW':>7}"
    )
    rows = [head, "-" * len(head)]
    for pt in points:
        if not pt.fits:
            rows.append(f"{pt.n_gpus:>9,}  no layout fits")
            continue
        p, best = pt.plan.projection, pt.plan.result.best
        rows.append(
            f"{pt.n_gpus:>9,}  {best.layout.short():<28} {si(p.tokens_per_s):>9} {p.mfu:>6.1%} "
            f"{p.wall_days:>8.1f} {p.reliability.goodput:>8.1%} {money(p.cost_usd):>10} {p.power_mw:>7.1f}"
        )
    return rows


def plot_sweep(points: list[SweepPoint], path: str, title: str) -> None:
    """Tokens/s, MFU and wall-clock days against GPU count (matplotlib imported only here)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ColossusError("--plot needs matplotlib: pip install 'colossuslm[plot]'") from None
    ok = [pt for pt in points if pt.fits]
    if not ok:
        raise ColossusError("nothing to plot: no GPU count in the sweep has a layout that fits")
    n = [pt.n_gpus for pt in ok]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    tps = [pt.plan.projection.tokens_per_s for pt in ok]
    ideal = [tps[0] * k / n[0] for k in n]
    axes[0].loglog(n, tps, "o-", label="predicted")
    axes[0].loglog(n, ideal, "--", color="grey", label="linear from the first point")
    axes[0].set_ylabel("tokens / s")
    axes[0].legend()
    axes[1].semilogx(n, [100 * pt.plan.projection.mfu for pt in ok], "o-", label="MFU")
    axes[1].semilogx(n, [100 * pt.plan.projection.reliability.goodput for pt in ok], "s--", label="goodput")
    axes[1].set_ylabel("%")
    axes[1].set_ylim(0, 100)
    axes[1].legend()
    axes[2].loglog(n, [pt.plan.projection.wall_days for pt in ok], "o-")
    axes[2].set_ylabel("wall-clock days")
    for ax in axes:
        ax.set_xlabel("GPUs")
        ax.grid(True, which="both", alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)

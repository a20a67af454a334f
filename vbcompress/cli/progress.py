"""Progress on stderr: one bar per stage of a fit or calibration, one bar for a batch."""

from __future__ import annotations

import os
import sys
import time

from .options import flag_of

QUIET_VARIABLES = ("HF_HUB_DISABLE_PROGRESS_BARS", "TQDM_DISABLE")


def progress_off() -> bool:
    """Off when HF_HUB_DISABLE_PROGRESS_BARS or TQDM_DISABLE is set, as users of the Hugging Face tools expect."""
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes") for v in QUIET_VARIABLES)


def progress_bar():
    """A stderr progress callback for the bank fit and calibration (tqdm), closed by the caller."""
    from tqdm import tqdm

    bars: dict = {}
    off = progress_off()

    def update(stage: str, i: int, total: int, value: float) -> None:
        bar = bars.get(stage)
        if bar is None:
            for other in bars.values():
                other.close()
            bar = bars[stage] = tqdm(total=total, desc=f"{stage:9s}", unit="step", leave=False, file=sys.stderr, disable=off)
        bar.n = i
        # calibration reports √(loss), where the loss is the distance to the teacher over the adapter's effect
        bar.set_postfix_str(f"loss {value:.4f}" if stage == "calibrate" else f"ΔW error {value:.4f}", refresh=False)
        bar.refresh()

    update.close = lambda: [b.close() for b in bars.values()]
    return update


def batch_bar(total: int):
    """One stderr bar for a batch: done / failed / skipped and adapters per minute; failures as lines."""
    from tqdm import tqdm

    bar = tqdm(total=total, desc="add", unit="adapter", file=sys.stderr, disable=progress_off())
    start = time.monotonic()

    def update(outcome, report) -> None:
        if outcome.status == "failed":
            tqdm.write(f"error: {outcome.error.render(flag_of)}", file=sys.stderr)
        bar.update(1)
        rate = 60 * bar.n / max(time.monotonic() - start, 1e-9)
        bar.set_postfix_str(f"added {len(report.added)}, skipped {len(report.skipped)}, failed {len(report.failed)}, {rate:.1f}/min")

    update.close = bar.close
    return update


class closing:
    """``with closing(bar):`` closes a progress callback (or None) however the block ends."""

    def __init__(self, bar):
        self.bar = bar

    def __enter__(self):
        return self.bar

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.close()
        return False

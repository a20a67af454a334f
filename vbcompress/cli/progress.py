"""Progress on stderr: one bar per stage of a fit or calibration, one bar for a batch; plain lines (no carriage
returns) when stderr is not a terminal, so piped logs stay readable; nothing with ``--quiet``."""

from __future__ import annotations

import os
import sys
import time

from .options import flag_of

QUIET_VARIABLES = ("HF_HUB_DISABLE_PROGRESS_BARS", "TQDM_DISABLE")
# Off a terminal: nothing for work shorter than PLAIN_AFTER_S, then a line at most every PLAIN_EVERY_S and one
# when the stage ends, so a log shows where a long run is without a line per step.
PLAIN_AFTER_S, PLAIN_EVERY_S = 5.0, 10.0
quiet = False  # set by the group's --quiet


def progress_off() -> bool:
    """Off with ``--quiet``, or when HF_HUB_DISABLE_PROGRESS_BARS or TQDM_DISABLE is set, as users of the Hugging
    Face tools expect."""
    return quiet or any(os.environ.get(v, "").lower() in ("1", "true", "yes") for v in QUIET_VARIABLES)


def measured(stage: str, value: float) -> str:
    """What a stage reports: calibration √(loss) (the distance to the teacher over the adapter's effect), a
    fit's ΔW error, nothing for a stage that only counts (NaN)."""
    if value != value:
        return ""
    return f"loss {value:.4f}" if stage == "calibrate" else f"ΔW error {value:.4f}"


def on_terminal() -> bool:
    return sys.stderr.isatty()


def plain_lines():
    """The fit/calibration callback off a terminal: plain lines, throttled (see PLAIN_AFTER_S)."""
    state = {"stage": None, "start": 0.0, "last": 0.0}

    def update(stage: str, i: int, total: int, value: float) -> None:
        now = time.monotonic()
        if stage != state["stage"]:
            state.update(stage=stage, start=now, last=now)
        if now - state["start"] < PLAIN_AFTER_S or (i < total and now - state["last"] < PLAIN_EVERY_S):
            return
        state["last"] = now
        what = measured(stage, value)
        print(f"{stage}: step {i}/{total}{', ' + what if what else ''} ({now - state['start']:.0f} s)", file=sys.stderr, flush=True)

    update.close = lambda: None
    return update


def progress_bar():
    """A stderr progress callback for the bank fit and calibration (tqdm on a terminal, plain lines
    elsewhere), closed by the caller."""
    from tqdm import tqdm

    bars: dict = {}
    off = progress_off()
    if not off and not on_terminal():
        return plain_lines()

    def update(stage: str, i: int, total: int, value: float) -> None:
        bar = bars.get(stage)
        if bar is None:
            for other in bars.values():
                other.close()
            bar = bars[stage] = tqdm(total=total, desc=f"{stage:9s}", unit="step", leave=False, file=sys.stderr, disable=off)
        bar.n = i
        bar.set_postfix_str(measured(stage, value), refresh=False)
        bar.refresh()

    update.close = lambda: [b.close() for b in bars.values()]
    return update


def batch_bar(total: int):
    """One stderr bar for a batch: done / failed / skipped and adapters per minute; failures as lines."""
    from tqdm import tqdm

    off, plain = progress_off(), not on_terminal()
    bar = tqdm(total=total, desc="add", unit="adapter", file=sys.stderr, disable=off or plain)
    start, done, last = time.monotonic(), [0], [time.monotonic()]

    def update(outcome, report) -> None:
        if outcome.status == "failed":
            tqdm.write(f"error: {outcome.error.render(flag_of)}", file=sys.stderr)
        bar.update(1)
        done[0] += 1
        rate = 60 * done[0] / max(time.monotonic() - start, 1e-9)
        counts = f"added {len(report.added)}, skipped {len(report.skipped)}, failed {len(report.failed)}, {rate:.1f}/min"
        now = time.monotonic()
        if plain and not off and now - start >= PLAIN_AFTER_S and (done[0] == total or now - last[0] >= PLAIN_EVERY_S):
            last[0] = now
            print(f"add: {done[0]}/{total} ({counts})", file=sys.stderr, flush=True)
        bar.set_postfix_str(counts)

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

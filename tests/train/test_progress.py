"""The run's progress output on a terminal (a live line redrawn in place) and in a log file
(plain, rate-limited lines), and the update's micro-batch callback."""
import io
import re

from epo_jax.train import progress as progress_lib
from epo_jax.train.progress import Progress


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_terminal_redraws_one_live_line_and_clears_it_for_permanent_lines():
    out = FakeTerminal()
    with Progress(stream=out) as progress:
        assert progress.tty
        progress.info("model: llama, 0.1M parameters")
        progress.begin_step(1, 20)
        progress.rollout_turn(4, 1, 2, {"rollout/new_tokens": 64.0, "time/generate_s": 2.0})
        progress.rollout_turn(4, 2, 2, {"rollout/new_tokens": 128.0, "time/generate_s": 4.0})
        progress.line("step 1/20 | succ 0.00")
    text = out.getvalue()
    assert re.search(r"^\[\s*\d+\.\ds\] model: llama, 0.1M parameters$", text, re.M)
    # The live line is drawn with carriage returns (tqdm), not as new lines.
    assert "\rstep 1/20 | rollout turn 1/4 | 2 active | 64 tokens | 32 tok/s" in text
    assert "\rstep 1/20 | rollout turn 2/4 | 2 active | 128 tokens | 32 tok/s" in text
    assert text.rstrip("\n").endswith("step 1/20 | succ 0.00")
    assert sum(line.startswith("step 1/20 | rollout") for line in text.split("\n")) == 0


def test_log_output_prints_plain_live_lines_at_most_every_interval():
    out = io.StringIO()
    progress = Progress(stream=out, plain_interval_s=3600.0)
    assert not progress.tty
    progress.begin_step(2, 20)
    for turn in range(1, 5):
        progress.rollout_turn(4, turn, 2, {"rollout/new_tokens": 10.0 * turn, "time/generate_s": 1.0})
    assert out.getvalue() == ""  # within the interval: nothing
    chatty = Progress(stream=out, plain_interval_s=0.0)
    chatty.begin_step(2, 20)
    chatty.begin_update(4)
    chatty.micro_batch()
    chatty.micro_batch()
    lines = out.getvalue().splitlines()
    assert len(lines) == 2 and "\r" not in out.getvalue()
    assert re.fullmatch(r"\[\s*\d+\.\ds\] step 2/20 \| update micro-batch 2/4", lines[1])


def test_disabled_progress_prints_nothing():
    out = FakeTerminal()
    progress = Progress(stream=out, enabled=False)
    progress.info("x")
    progress.live("y")
    progress.line("z")
    assert out.getvalue() == ""


def test_the_update_callback_reaches_the_active_reporter_only():
    out = io.StringIO()
    progress_lib.micro_batch_done()  # no active reporter: nothing happens
    with Progress(stream=out, plain_interval_s=0.0) as progress:
        progress.begin_step(3, 5)
        progress.begin_update(2)
        progress_lib.micro_batch_done()
    progress_lib.micro_batch_done()
    assert out.getvalue().count("update micro-batch") == 1
    assert "step 3/5 | update micro-batch 1/2" in out.getvalue()


def test_the_jitted_update_reports_each_micro_batch():
    """A jitted scan with the update's callback reports every micro-batch, in order."""
    import jax
    import jax.numpy as jnp

    def body(total, x):
        loss = jnp.sum(x * x)
        jax.debug.callback(progress_lib.micro_batch_done, loss)
        return total + loss, loss

    out = io.StringIO()
    with Progress(stream=out, plain_interval_s=0.0) as progress:
        progress.begin_step(1, 1)
        progress.begin_update(3)
        total, _ = jax.jit(lambda xs: jax.lax.scan(body, 0.0, xs))(jnp.arange(6.0).reshape(3, 2))
        jax.block_until_ready(total)
        jax.effects_barrier()
    lines = [line.split("] ", 1)[1] for line in out.getvalue().splitlines()]
    assert lines == [f"step 1/1 | update micro-batch {i}/3" for i in (1, 2, 3)]

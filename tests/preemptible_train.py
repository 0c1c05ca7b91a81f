"""`python -m owl_jax.train` with a preemption point, for the resume tests.

With OWL_TEST_HANG_BEFORE_STEP=N, process 0 stops before it reads the batches of step N + 1: it
writes OWL_TEST_HANG_MARKER (a path) and waits until a signal reaches it; the other processes wait
for it in the next step's exchange. A SIGTERM then lands in the middle of a checkpoint interval, so
the save it triggers is the one that has to run.
"""
import os
import signal
import time

from absl import app, flags

from owl_jax import train as train_module
from owl_jax.cli import parse_absl_flags
from owl_jax.training import data_source

HANG_BEFORE_STEP = int(os.environ["OWL_TEST_HANG_BEFORE_STEP"])
MARKER = os.environ["OWL_TEST_HANG_MARKER"]


class HangingIterator:
    def __init__(self, inner, batches_before_hang: int):
        self.inner, self.left = inner, batches_before_hang

    def __getattr__(self, name):  # get_state / set_state
        return getattr(self.inner, name)

    def __iter__(self):
        return self

    def __next__(self):
        import jax

        if self.left == 0 and jax.process_index() == 0:
            self._wait_for_a_signal()
        self.left -= 1
        return next(self.inner)

    @staticmethod
    def _wait_for_a_signal():
        arrived = []
        train_handler = signal.getsignal(signal.SIGTERM)

        def handler(signum, frame):
            arrived.append(signum)
            if callable(train_handler):
                train_handler(signum, frame)

        signal.signal(signal.SIGTERM, handler)
        with open(MARKER, "w") as f:
            f.write(str(os.getpid()))
        while not arrived:
            time.sleep(0.05)


def make_hanging_iterator(config, *args, **kwargs):
    inner = make_data_iterator(config, *args, **kwargs)
    return HangingIterator(inner, HANG_BEFORE_STEP * config.optim.grad_accum_steps)


make_data_iterator = data_source.make_data_iterator
data_source.make_data_iterator = make_hanging_iterator

if __name__ == "__main__":
    train_module._define_flags()
    flags.mark_flags_as_required(["config"])
    app.run(train_module.main, flags_parser=parse_absl_flags)

"""Run the specchat console script with one fault injected, for tests/test_faults.py (a subprocess).

    python tests/faultrun.py FAULT NAME -- specchat arguments...

FAULT is one of:
  kill    the process dies (os._exit(137), as by SIGKILL) when a file named NAME is about to be
          renamed into place: after its bytes were written, before they count
  slow    each rename into place of a file whose name contains NAME takes a second (so two
          processes building one thing overlap)
  sigint  SIGINT to itself on the NAME-th forward of a model (1 = the prefill), or with NAME
          ``load`` as the target's weights start loading
"""

import os
import signal
import sys
import time


def main() -> None:
    fault, name, separator, *arguments = sys.argv[1:]
    assert separator == "--"
    real_replace = os.replace

    def replace(src, dst, *args, **kwargs):
        base = os.path.basename(str(dst))
        if fault == "kill" and base == name:
            os._exit(137)
        if fault == "slow" and name in base:
            time.sleep(1.0)
        return real_replace(src, dst, *args, **kwargs)

    os.replace = replace
    if fault == "sigint" and name == "load":
        import specchat.app.loader as loader

        real_load = loader.load_target

        def load_target(*args, **kwargs):
            os.kill(os.getpid(), signal.SIGINT)
            return real_load(*args, **kwargs)

        loader.load_target = load_target
    elif fault == "sigint":
        from specchat.model.lm import LayeredLM

        real_forward, calls = LayeredLM.forward, []

        def forward(self, *args, **kwargs):
            calls.append(1)
            if len(calls) == int(name):
                os.kill(os.getpid(), signal.SIGINT)
            return real_forward(self, *args, **kwargs)

        LayeredLM.forward = forward
    from specchat.cli.entry import main as specchat

    sys.argv = ["specchat", *arguments]
    specchat()


if __name__ == "__main__":
    main()

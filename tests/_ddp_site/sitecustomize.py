"""Instrumentation for the ranks that tests/test_distributed.py launches (it puts this directory on PYTHONPATH).

Only in a rank (RANK is set; torchrun's agent process is left alone), and only for the variables set:
- SAE_KIT_TEST_AUDIT=<dir>:<log>: record every write-like file event under <dir> (opens for writing, renames,
  removals, mkdirs) in <log>.<rank>, through Python's audit hooks (so "only rank 0 writes" is observed, not assumed);
- SAE_KIT_TEST_SAE_DTYPE=float64: train the SAEs in that dtype (so top-k ties do not flip between runs);
- SAE_KIT_TEST_KILL=<rank>:<step>: SIGKILL that rank when one of its trainers is about to take that step.
"""

import os
import signal
import sys

if "RANK" in os.environ:
    rank = os.environ["RANK"]
    audit = os.environ.get("SAE_KIT_TEST_AUDIT")
    if audit:
        root, _, log = audit.partition(":")
        root = os.path.realpath(root)
        fd = os.open(f"{log}.{rank}", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

        def _under(path) -> bool:
            if isinstance(path, bytes):
                path = path.decode(errors="replace")
            if not isinstance(path, (str, os.PathLike)):
                return False
            return os.path.realpath(os.fspath(path)).startswith(root)

        def _hook(event, args):
            if event == "open":
                path, mode, flags = args
                writes = (mode is not None and any(c in mode for c in "wax+")) or bool((flags or 0) & write_flags)
                hit = writes and _under(path)
            elif event in ("os.rename", "os.remove", "os.mkdir", "os.rmdir", "shutil.rmtree", "os.truncate"):
                hit = _under(args[0])
            else:
                return
            if hit:
                os.write(fd, f"{event} {args[0]}\n".encode())

        sys.addaudithook(_hook)

    dtype = os.environ.get("SAE_KIT_TEST_SAE_DTYPE")
    kill = os.environ.get("SAE_KIT_TEST_KILL")
    if dtype or kill:
        import functools

        import sae_kit.training.run as run
        from sae_kit.training.trainer import Trainer

        if dtype:
            run.SAEConfig = functools.partial(run.SAEConfig, dtype=dtype)  # type: ignore[misc]
        if kill and kill.split(":")[0] == rank:
            at = int(kill.split(":")[1])
            step = Trainer.step

            def _step(self, *args, **kwargs):
                if self.step_count == at:
                    os.kill(os.getpid(), signal.SIGKILL)
                return step(self, *args, **kwargs)

            Trainer.step = _step  # type: ignore[method-assign]

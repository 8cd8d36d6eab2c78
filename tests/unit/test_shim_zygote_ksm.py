"""The zygote offers its memory to KSM only when asked to (BERTH_SHIM_KSM=1)."""

from __future__ import annotations

import os

from core.shim import zygote


def _mergeable_writable_mappings(env_value: str | None) -> tuple[int, int]:
    """In a forked child: (writable private mappings, those flagged mergeable "mg")."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(r)
            if env_value is None:
                os.environ.pop("BERTH_SHIM_KSM", None)
            else:
                os.environ["BERTH_SHIM_KSM"] = env_value
            zygote._offer_to_ksm()
            writable = mergeable = 0
            perms = ""
            with open("/proc/self/smaps") as f:
                for line in f:
                    fields = line.split()
                    if "-" in fields[0] and not fields[0].endswith(":"):
                        perms = fields[1]
                    elif fields[0] == "VmFlags:" and perms == "rw-p":
                        writable += 1
                        mergeable += "mg" in fields[1:]
            os.write(w, f"{writable} {mergeable}".encode())
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    try:
        data = os.read(r, 100).decode()
    finally:
        os.close(r)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    writable, mergeable = map(int, data.split())
    return writable, mergeable


def test_ksm_is_opt_in():
    writable, mergeable = _mergeable_writable_mappings(None)
    assert writable > 0 and mergeable == 0
    assert _mergeable_writable_mappings("0")[1] == 0


def test_ksm_marks_the_writable_private_mappings():
    writable, mergeable = _mergeable_writable_mappings("1")
    # A few writable mappings may be refused (e.g. ones mapped after the scan).
    assert mergeable >= writable - 2 and mergeable > 0

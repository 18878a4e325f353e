"""Regenerate the benchmark's protobuf code from ``benchmarks/benchcall.proto``.

``python -m benchmarks._rawpb`` writes

* ``benchmarks/_rawpb/benchcall_pb2.py``: upb-backed ``google.protobuf`` messages
  for the raw grpclib baseline (``# ruff: noqa`` is prepended: generated code);
* ``benchmarks/_proto/``: betterproto2 messages for micro's proto-first path.

Needs the dev extras (``grpcio-tools``, ``betterproto2-compiler``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCH = HERE.parent
PROTO = BENCH / "benchcall.proto"


def main() -> None:
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    out = BENCH / "_proto"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", f"-I{BENCH}",
         f"--python_out={HERE}", f"--python_betterproto2_out={out}",
         "--python_betterproto2_opt=client_generation=async",
         "--python_betterproto2_opt=server_generation=async", str(PROTO)],
        check=True, env=env,
    )
    pb2 = HERE / "benchcall_pb2.py"
    text = pb2.read_text()
    if not text.startswith("# ruff: noqa"):
        pb2.write_text("# ruff: noqa\n" + text)
    print(f"wrote {pb2.relative_to(BENCH.parent)} and {out.relative_to(BENCH.parent)}/")


if __name__ == "__main__":
    main()

"""The committed admin-API stubs are what protoc makes of protos/router/v1/router.proto."""

from __future__ import annotations

import shutil
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
GENERATED = ("router_pb2.py", "router_pb2.pyi", "router_pb2_grpc.py")


def test_generated_admin_stubs_match_the_proto(tmp_path):
    shutil.copytree(ROOT / "protos", tmp_path / "protos")
    out = tmp_path / "out"
    out.mkdir()
    status = protoc.main([
        "grpc_tools.protoc", f"-I{tmp_path / 'protos'}", f"--python_out={out}",
        f"--pyi_out={out}", f"--grpc_python_out={out}",
        str(tmp_path / "protos" / "router" / "v1" / "router.proto"),
    ])
    assert status == 0, "protoc failed on protos/router/v1/router.proto"
    for name in GENERATED:
        fresh = (out / "router" / "v1" / name).read_text()
        committed = (ROOT / "router" / "v1" / name).read_text()
        assert fresh == committed, (
            f"router/v1/{name} is stale: regenerate it (see README, Development)"
        )

"""pdserve's gRPC schema (``pdserve.proto``) and its generated Python stubs.

The stubs (``pdserve_pb2.py``, ``pdserve_pb2_grpc.py``) are checked in, so an install needs no
code generation; ``tests/router/test_proto.py`` regenerates them into a temporary folder and
fails when they no longer match the ``.proto``. After editing the ``.proto``::

    python -m pdserve.router.proto      # rewrites the stubs beside it
"""

from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).parent
PROTO = HERE / "pdserve.proto"
STUBS = ("pdserve_pb2.py", "pdserve_pb2_grpc.py")
# The servicer's registration function, for a Ray Serve gRPC proxy config. pdserve itself does
# not serve through that proxy (it loses cancellations and binds every interface, see
# ``router/grpc_service.py``): its gRPC API is the router replica's, on ``router.grpc_port``.
SERVICER_FUNCTION = "pdserve.router.proto.pdserve_pb2_grpc.add_PdServeServicer_to_server"


def generate(out_dir: Path) -> list[Path]:
    """Compile ``pdserve.proto`` into ``out_dir``; returns the stub paths.

    protoc assumes the stubs are top-level modules; two lines are rewritten so they work
    inside the ``pdserve`` package: the gRPC stub's ``import pdserve_pb2`` becomes relative,
    and the message classes are registered under the module's real name (``__name__``), or
    pickling them (Ray Serve's gRPC proxy pickles each request) fails to import
    ``pdserve_pb2``."""
    from grpc_tools import protoc

    out_dir.mkdir(parents=True, exist_ok=True)
    rc = protoc.main(["grpc_tools.protoc", f"-I{HERE}", f"--python_out={out_dir}",
                      f"--grpc_python_out={out_dir}", str(PROTO)])
    if rc != 0:
        raise RuntimeError(f"protoc failed on {PROTO} (exit {rc})")
    pb2 = out_dir / STUBS[0]
    pb2.write_text(pb2.read_text().replace("(DESCRIPTOR, 'pdserve_pb2', _globals)",
                                           "(DESCRIPTOR, __name__, _globals)"))
    grpc_stub = out_dir / STUBS[1]
    grpc_stub.write_text(grpc_stub.read_text().replace(
        "import pdserve_pb2 as pdserve__pb2", "from . import pdserve_pb2 as pdserve__pb2"))
    for stub in STUBS:  # generated code: not ours to lint
        path = out_dir / stub
        path.write_text("# ruff: noqa\n" + path.read_text())
    return [out_dir / s for s in STUBS]

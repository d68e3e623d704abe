"""A Google Cloud Storage JSON API emulator (`gcp-storage-emulator`, in memory) on 127.0.0.1 in its own
process, for tests that exercise the real GCS client (gcsfs) without a network. Needs the dev extra.

While it runs, for this process and every process it starts:
- `STORAGE_EMULATOR_HOST` points gcsfs at it (gcsfs reads it when a filesystem is made; no
  credentials are needed: with none in the environment gcsfs connects anonymously);
- `GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false`: by default gcsfs (>= 2026.8) asks the Storage Control
  gRPC API for each bucket's layout (zonal / hierarchical namespace) before using it; the emulator
  has no such API, so every call would wait out a 60 s retry and fall back to the plain client.
  gcsfs reads this variable when it is first imported, so it must be set before that (`__enter__`
  checks). Against real GCS neither variable is needed.
Both are restored when it stops."""

from __future__ import annotations

import sys

from pipeline.tools.serverprocess import ServerProcess

ENV_FLAG = "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"


class GcsEmulator(ServerProcess):
    name = "the GCS emulator (gcp-storage-emulator)"

    def command(self, port: int) -> list[str]:
        return [sys.executable, "-m", "gcp_storage_emulator", "start", "--host", "127.0.0.1", "--port", str(port),
                "--in-memory", "--quiet"]

    def environment(self) -> dict[str, str]:
        return {"STORAGE_EMULATOR_HOST": self.endpoint, ENV_FLAG: "false"}

    def before_ready(self) -> None:
        check_plain_client()

    def bucket(self, name: str) -> str:
        """A new bucket; its `gs://` URL."""
        import gcsfs

        gcsfs.GCSFileSystem(endpoint_url=self.endpoint, token="anon", skip_instance_cache=True).mkdir(name)
        return f"gs://{name}"


def check_plain_client() -> None:
    """Fail early if gcsfs was imported before `GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false` was set: its
    GCSFileSystem would then be the variant that queries the Storage Control API (see above)."""
    if "gcsfs" not in sys.modules:
        return
    import gcsfs
    import gcsfs.core

    if gcsfs.GCSFileSystem is not gcsfs.core.GCSFileSystem:
        raise RuntimeError(f"gcsfs was imported before {ENV_FLAG}=false was set: start the emulator first")

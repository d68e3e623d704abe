"""moto's standalone S3 server on 127.0.0.1 (a separate process), for tests and benchmarks that
exercise the real S3 clients (s3fs, boto3, pyarrow) without a network. Needs `moto[server]` (the
dev extra). The usual AWS_* variables point at it while it runs, for this process and every process
it starts; they are restored when it stops."""

from __future__ import annotations

import sys

from pipeline.tools.serverprocess import ServerProcess


class MotoServer(ServerProcess):
    name = "moto's S3 server (moto[server])"
    ready_path = "/moto-api/"

    def command(self, port: int) -> list[str]:
        return [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]

    def environment(self) -> dict[str, str]:
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": "testing",
                "AWS_SECRET_ACCESS_KEY": "testing-secret", "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1"}

    def bucket(self, name: str) -> str:
        """A new bucket; its `s3://` URL."""
        import boto3

        boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1").create_bucket(Bucket=name)
        return f"s3://{name}"

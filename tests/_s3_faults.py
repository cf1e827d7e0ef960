"""Init functions that inject S3 faults into a pool's workers (tests/test_s3.py).

Faults go in through botocore's own extension point, an event handler on boto3's default
session (which zckpt.s3's client is made from), registered by the worker's ``init_fn``:
nothing inside zckpt is patched. Kept out of the test module so a worker unpickling
these functions imports only this small module (not torch and pytest).
"""

from __future__ import annotations

from typing import Any


def _register(handler: Any) -> None:
    import boto3

    boto3.setup_default_session()
    assert boto3.DEFAULT_SESSION is not None
    boto3.DEFAULT_SESSION.events.register("before-parameter-build.s3.UploadPart", handler)


def fail_upload_part(key_contains: str, part_number: int, while_exists: str) -> None:
    """While the file ``while_exists`` exists, every UploadPart of part ``part_number`` to
    a key containing ``key_contains`` is refused (403 AccessDenied: not worth a retry)."""
    import os

    def handler(params: dict[str, Any], **kwargs: Any) -> None:
        if key_contains in params.get("Key", "") and params.get("PartNumber") == part_number \
                and os.path.exists(while_exists):
            from botocore.exceptions import ClientError
            raise ClientError({"Error": {"Code": "AccessDenied", "Message": "injected fault: part refused"},
                               "ResponseMetadata": {"HTTPStatusCode": 403}}, "UploadPart")

    _register(handler)


def throttle_first_part(times: int) -> None:
    """The first ``times`` UploadPart calls in this worker answer 503 SlowDown (transient)."""
    left = [times]

    def handler(params: dict[str, Any], **kwargs: Any) -> None:
        if left[0] > 0:
            left[0] -= 1
            from botocore.exceptions import ClientError
            raise ClientError({"Error": {"Code": "SlowDown", "Message": "injected throttling"},
                               "ResponseMetadata": {"HTTPStatusCode": 503}}, "UploadPart")

    _register(handler)


def die_in_upload_part(part_number: int, once_file: str) -> None:
    """The first worker to send part ``part_number`` while ``once_file`` exists removes
    the file and dies on the spot (SIGKILL-like: ``os._exit``), its upload left open."""
    import os

    def handler(params: dict[str, Any], **kwargs: Any) -> None:
        if params.get("PartNumber") == part_number:
            try:
                os.unlink(once_file)
            except FileNotFoundError:
                return
            os._exit(9)

    _register(handler)

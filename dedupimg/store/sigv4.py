"""AWS Signature Version 4 for the few S3 requests obstore cannot make (creating a bucket, asking whether one
exists): the headers that sign one request, from hmac and hashlib only.

Credentials come from ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY`` and ``AWS_SESSION_TOKEN``, as obstore
reads them; without an access key the request goes unsigned (a server that allows anonymous access).
Reference: https://docs.aws.amazon.com/IAM/latest/UserGuide/reference_sigv-create-signed-request.html
"""

from __future__ import annotations

import hashlib
import hmac
import os
import time
from urllib.parse import quote, urlsplit


def _hmac(key: bytes, text: str) -> bytes:
    return hmac.new(key, text.encode(), hashlib.sha256).digest()


def sign(method: str, url: str, region: str, body: bytes = b"", service: str = "s3",
         now: float | None = None, env: dict[str, str] | None = None) -> dict[str, str]:
    """The headers to send with ``method url`` (``Host``, ``x-amz-date``, ``x-amz-content-sha256``, and
    ``Authorization`` plus ``x-amz-security-token`` when credentials are set). ``url`` has no query string."""
    env = dict(os.environ) if env is None else env
    parts = urlsplit(url)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(time.time() if now is None else now))
    headers = {"host": parts.netloc, "x-amz-date": stamp, "x-amz-content-sha256": hashlib.sha256(body).hexdigest()}
    key_id, secret = env.get("AWS_ACCESS_KEY_ID"), env.get("AWS_SECRET_ACCESS_KEY")
    if not key_id or not secret:
        return headers
    if env.get("AWS_SESSION_TOKEN"):
        headers["x-amz-security-token"] = env["AWS_SESSION_TOKEN"]
    names = sorted(headers)
    canonical = "\n".join([method, quote(parts.path or "/", safe="/-_.~"), "",
                           *(f"{n}:{headers[n].strip()}" for n in names), "", ";".join(names),
                           headers["x-amz-content-sha256"]])
    scope = f"{stamp[:8]}/{region}/{service}/aws4_request"
    to_sign = "\n".join(["AWS4-HMAC-SHA256", stamp, scope, hashlib.sha256(canonical.encode()).hexdigest()])
    key = _hmac(("AWS4" + secret).encode(), stamp[:8])
    for part in (region, service, "aws4_request"):
        key = _hmac(key, part)
    signature = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
    headers["authorization"] = (f"AWS4-HMAC-SHA256 Credential={key_id}/{scope}, SignedHeaders={';'.join(names)}, "
                                f"Signature={signature}")
    return headers

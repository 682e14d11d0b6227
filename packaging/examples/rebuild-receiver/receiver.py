#!/usr/bin/env python3
"""A receiver for driftwatch rebuild webhooks (Python 3.9+, standard library only).

It verifies each request the Standard Webhooks way (HMAC-SHA256 of
"{webhook-id}.{webhook-timestamp}.{body}" keyed with the secret the collector signs with, the
timestamp within five minutes), answers 202 as soon as the rebuild is queued, and runs your
rebuild command once per webhook-id (the collector may deliver a request twice), one at a
time, with the request body on stdin and these variables in its environment:

  DRIFTWATCH_ACTION_ID      the action id (= webhook-id)
  DRIFTWATCH_IDEMPOTENCY_KEY
  DRIFTWATCH_HOST_ID        the host to replace
  DRIFTWATCH_ROLE           its role label ("" when none): give the successor the same one
  DRIFTWATCH_IMAGE_ID, DRIFTWATCH_IMAGE_VERSION

The command's argv is run directly, never through a shell: host ids and paths in the request
are untrusted text. Handled ids are appended to STATE_DIR/handled (fsync'd before the 202), so
a restarted receiver still runs nothing twice.

  receiver.py --secret-file /etc/driftwatch/rebuild-webhook.secret \\
      --listen 127.0.0.1:9280 --state-dir /var/lib/rebuild-receiver \\
      [--tls-cert cert.pem --tls-key key.pem] -- /usr/local/bin/replace-host --queue prod

Point the collector at it: [actions] kind = "webhook", url = "http://127.0.0.1:9280/" (or
https:// with ca_file), secret_file = the same secret. See docs/rebuild-actions.md.
"""

import argparse
import base64
import hashlib
import hmac
import http.server
import json
import os
import queue
import ssl
import subprocess
import sys
import threading
import time

TOLERANCE_S = 5 * 60
MAX_BODY = 1024 * 1024
COMMAND_TIMEOUT_S = 30 * 60


def log(msg):
    print(f"rebuild-receiver: {msg}", file=sys.stderr, flush=True)


def load_key(path):
    text = open(path, encoding="ascii").read().strip()
    if not text.startswith("whsec_"):
        raise SystemExit(f"{path}: not a Standard Webhooks secret (whsec_<base64>)")
    try:
        key = base64.b64decode(text[len("whsec_"):], validate=True)
    except ValueError as e:
        raise SystemExit(f"{path}: the secret is not base64: {e}")
    if not 24 <= len(key) <= 64:
        raise SystemExit(f"{path}: a key of {len(key)} bytes (24 to 64 expected)")
    return key


def verify(key, headers, body, now=None):
    """Returns the parsed body, or raises ValueError saying why the request is refused."""
    msg_id = headers.get("webhook-id") or ""
    ts = headers.get("webhook-timestamp") or ""
    sigs = headers.get("webhook-signature") or ""
    if not msg_id or not ts or not sigs:
        raise ValueError("missing webhook-id, webhook-timestamp or webhook-signature")
    if not ts.isdigit():
        raise ValueError("webhook-timestamp is not Unix seconds")
    now = time.time() if now is None else now
    if abs(now - int(ts)) > TOLERANCE_S:
        raise ValueError("webhook-timestamp outside the tolerance")
    signed = msg_id.encode() + b"." + ts.encode() + b"." + body
    expected = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    for sig in sigs.split(" "):
        version, _, value = sig.partition(",")
        if version == "v1" and hmac.compare_digest(value, expected):
            return json.loads(body)
    raise ValueError("no matching v1 signature")


class Handled:
    """The webhook-ids already queued, kept in a file so a restart runs nothing twice."""

    def __init__(self, state_dir):
        os.makedirs(state_dir, mode=0o700, exist_ok=True)
        self.path = os.path.join(state_dir, "handled")
        self.ids = set()
        if os.path.exists(self.path):
            with open(self.path, encoding="utf-8") as f:
                self.ids = {line.strip() for line in f if line.strip()}
        self.lock = threading.Lock()

    def add(self, msg_id):
        """False when msg_id was handled before; otherwise records it durably."""
        with self.lock:
            if msg_id in self.ids:
                return False
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(msg_id + "\n")
                f.flush()
                os.fsync(f.fileno())
            self.ids.add(msg_id)
            return True


def worker(jobs, argv):
    while True:
        msg_id, body, data = jobs.get()
        d = data.get("data", {})
        env = dict(os.environ)
        env.update(
            DRIFTWATCH_ACTION_ID=msg_id,
            DRIFTWATCH_IDEMPOTENCY_KEY=str(d.get("idempotency_key", "")),
            DRIFTWATCH_HOST_ID=str(d.get("host", {}).get("id", "")),
            DRIFTWATCH_ROLE=str(d.get("role", "")),
            DRIFTWATCH_IMAGE_ID=str(d.get("image", {}).get("id", "")),
            DRIFTWATCH_IMAGE_VERSION=str(d.get("image", {}).get("version", "")),
        )
        log(f"{msg_id}: rebuilding {env['DRIFTWATCH_HOST_ID']!r}: {' '.join(argv)}")
        try:
            r = subprocess.run(argv, input=body, env=env, timeout=COMMAND_TIMEOUT_S)
            log(f"{msg_id}: rebuild command exited with status {r.returncode}")
        except (OSError, subprocess.TimeoutExpired) as e:
            log(f"{msg_id}: rebuild command failed: {e}")


def make_handler(key, handled, jobs):
    class Handler(http.server.BaseHTTPRequestHandler):
        server_version = "driftwatch-rebuild-receiver"
        timeout = 30  # a client that stalls mid-request is dropped

        def answer(self, status, text):
            data = (json.dumps({"status": text}) + "\n").encode()
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_POST(self):  # noqa: N802 (the http.server API)
            try:
                length = int(self.headers.get("content-length", ""))
            except ValueError:
                return self.answer(411, "content-length required")
            if not 0 <= length <= MAX_BODY:
                return self.answer(413, "body too large")
            body = self.rfile.read(length)
            headers = {k.lower(): v for k, v in self.headers.items()}
            try:
                data = verify(key, headers, body)
            except ValueError as e:
                log(f"refused a request from {self.client_address[0]}: {e}")
                return self.answer(401, "refused")
            msg_id = headers["webhook-id"]
            if not handled.add(msg_id):
                log(f"{msg_id}: delivered again, already queued")
                return self.answer(200, "already queued")
            jobs.put((msg_id, body, data))
            self.answer(202, "queued")

        def log_message(self, fmt, *args):  # one line per request, to stderr
            log(f"{self.client_address[0]} {fmt % args}")

    return Handler


def main():
    p = argparse.ArgumentParser(
        description="Receive driftwatch rebuild webhooks and run a rebuild command for each.",
        epilog="Everything after -- is the rebuild command (run without a shell).",
    )
    p.add_argument("--secret-file", required=True, help="the whsec_… secret the collector signs with")
    p.add_argument("--listen", default="127.0.0.1:9280", help="HOST:PORT (default %(default)s)")
    p.add_argument("--state-dir", default="/var/lib/rebuild-receiver", help="where handled ids are kept")
    p.add_argument("--tls-cert", help="serve HTTPS with this certificate chain (PEM)")
    p.add_argument("--tls-key", help="and this private key (PEM)")
    p.add_argument("command", nargs="+", help="the rebuild command and its arguments")
    args = p.parse_args()
    if bool(args.tls_cert) != bool(args.tls_key):
        p.error("--tls-cert and --tls-key go together")
    host, _, port = args.listen.rpartition(":")
    if not host or not port.isdigit():
        p.error(f"--listen {args.listen!r}: expected HOST:PORT")

    key = load_key(args.secret_file)
    handled = Handled(args.state_dir)
    jobs = queue.Queue()
    threading.Thread(target=worker, args=(jobs, args.command), daemon=True).start()
    server = http.server.ThreadingHTTPServer((host.strip("[]"), int(port)), make_handler(key, handled, jobs))
    scheme = "http"
    if args.tls_cert:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(args.tls_cert, args.tls_key)
        server.socket = ctx.wrap_socket(server.socket, server_side=True)
        scheme = "https"
    log(f"listening on {scheme}://{args.listen}/")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()

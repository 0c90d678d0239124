"""Verify DKIM signatures with dkimpy, an implementation independent of
the Go code under test.

Reads JSON from stdin: {"records": {"sel._domainkey.example.test": "v=DKIM1; ..."},
"messages": {"name": "<base64 message>"}} and writes JSON to stdout:
{"name": [{"ok": true, "error": ""}, ...]} with one entry per
DKIM-Signature field, topmost first. Key records come only from the input,
never from DNS.
"""
import base64
import json
import logging
import sys

import dkim


def main():
    req = json.load(sys.stdin)
    records = {k.lower().rstrip("."): v.encode() for k, v in req["records"].items()}

    def dnsfunc(name, timeout=5):
        if isinstance(name, bytes):
            name = name.decode()
        return records.get(name.lower().rstrip("."))

    logger = logging.getLogger("dkimpy")
    logger.addHandler(logging.NullHandler())
    out = {}
    for name, data in req["messages"].items():
        msg = base64.b64decode(data)
        d = dkim.DKIM(msg, logger=logger)
        n = sum(1 for k, _ in d.headers if k.lower() == b"dkim-signature")
        results = []
        for i in range(n):
            try:
                ok = bool(dkim.DKIM(msg, logger=logger).verify(idx=i, dnsfunc=dnsfunc))
                results.append({"ok": ok, "error": ""})
            except Exception as e:  # report, do not crash: the Go test decides
                results.append({"ok": False, "error": "%s: %s" % (type(e).__name__, e)})
        out[name] = results
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()

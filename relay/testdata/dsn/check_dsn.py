#!/usr/bin/python3
"""Independent check of a baton DSN: parse it with Python's email package
(policy.default) and print what a DSN consumer sees, as JSON."""
import email
import json
import sys
from email import policy


def fields(block):
    return {k: str(v) for k, v in block.items()}


def main(path):
    with open(path, "rb") as f:
        raw = f.read()
    msg = email.message_from_bytes(raw, policy=policy.default)
    out = {
        "content_type": msg.get_content_type(),
        "report_type": msg.get_param("report-type"),
        "headers": {k: str(v) for k, v in msg.items() if k.lower() != "content-type"},
        "parts": [],
        "defects": [],
    }
    for part in msg.walk():
        out["defects"] += [type(d).__name__ for d in part.defects]
    if not msg.is_multipart():
        print(json.dumps(out))
        return
    for part in msg.iter_parts():
        ct = part.get_content_type()
        p = {"type": ct}
        if ct == "text/plain":
            p["text"] = part.get_content()
        elif ct in ("message/delivery-status", "message/global-delivery-status"):
            blocks = part.get_payload()
            if isinstance(blocks, list):
                p["per_message"] = fields(blocks[0])
                p["recipients"] = [fields(b) for b in blocks[1:]]
            else:
                p["raw"] = str(blocks)
        elif ct in ("message/rfc822", "message/global"):
            inner = part.get_payload()
            inner = inner[0] if isinstance(inner, list) else inner
            if isinstance(inner, (bytes, str)):
                inner = email.message_from_bytes(inner if isinstance(inner, bytes) else inner.encode(), policy=policy.default)
            p["subject"] = str(inner.get("Subject"))
            p["body"] = inner.get_payload(decode=True).decode("utf-8", "replace")
        else:
            content = part.get_payload(decode=True).decode("utf-8", "replace")
            p["content"] = content
            hdr = email.message_from_string(content, policy=policy.default)
            p["subject"] = str(hdr.get("Subject"))
        out["parts"].append(p)
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1])

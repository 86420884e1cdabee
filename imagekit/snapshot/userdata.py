"""The user-data a snapshot guest boots with: the caller's parts plus imagekit's reporter.

A MIME multi-part document (cloud-init's own format) made of, in this order:

1. imagekit's **reporter**, a ``#cloud-boothook``: cloud-init runs it early in its
   ``init`` stage. It writes a small script to ``/run/imagekit/`` (tmpfs: nothing of it
   stays in the image), starts it as a transient systemd unit (``systemd-run``; a
   background shell where there is none) and prints ``IMAGEKIT-STARTED <nonce>`` on the
   serial console. The script waits for cloud-init to finish (``/run/cloud-init/result.json``
   appears) or for a stage to end with errors (``status.json``: it fails fast), prints
   ``IMAGEKIT-RESULT <nonce> status=<done|error> result=<base64 of cloud-init's result
   JSON>``, and in ``provision`` mode, after a clean ``done``,
   generalises the guest: ``cloud-init clean --logs --machine-id --seed`` (without
   ``--machine-id`` on cloud-init older than 22.3), an empty ``/etc/machine-id``
   (uninitialised: systemd makes a new one at the next boot), no SSH host keys, logs and
   journal emptied, shell histories, DHCP leases and package caches removed; then it prints
   ``IMAGEKIT-GENERALISED <nonce> rc=<status>``. ``verify`` mode only reports.
2. the caller's user-data, as given (``#cloud-config``, a ``#!`` script, a
   ``#cloud-boothook``, an ``#include`` list or a MIME document);
3. ``packages``: a ``#cloud-config`` part whose ``merge_how`` appends to the caller's
   lists instead of replacing them;
4. ``scripts``: one ``text/x-shellscript`` part each, named so that they run in order
   (cloud-init runs them in its final stage, after the packages).

The nonce is random per boot, so a marker from another boot (or echoed back from the
user-data itself) is never taken for this one: the markers below are written with the
nonce, and the script text never contains a whole marker line.
"""

from __future__ import annotations

import email.mime.multipart
import email.mime.text
import json
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from email.message import Message
from email.parser import Parser
from typing import Literal

from imagekit.errors import UsageError

Mode = Literal["provision", "verify"]

# Nova refuses user-data over 65535 bytes once base64-encoded.
NOVA_USER_DATA_LIMIT = 65535
MARKER_PREFIX = "IMAGEKIT-"

# First line of a user-data part -> its MIME type (cloud-init's own prefixes).
_PART_TYPES = (
    ("#cloud-config", "text/cloud-config"),
    ("#cloud-boothook", "text/cloud-boothook"),
    ("#include", "text/x-include-url"),
    ("#!", "text/x-shellscript"),
    ("## template: jinja", "text/jinja2"),
)

_SCRIPT = r"""#!/bin/sh
# imagekit snapshot reporter (written by imagekit's boot hook into /run; not kept in the image)
N=@NONCE@
MODE=@MODE@
say() {
  for t in /dev/ttyS0 /dev/hvc0 /dev/ttyAMA0; do
    [ -c "$t" ] && printf '%s\n' "$*" > "$t" 2>/dev/null
  done
  return 0
}
# Wait for cloud-init: result.json appears when its last stage ends; a stage that ended with
# errors (status.json) ends the wait at once: failing fast, cloud-init goes on meanwhile.
OUT=$(python3 - <<'IMAGEKIT_PY' 2>/dev/null
import base64, json, time
def load(path):
    try:
        with open(path) as f:
            return json.load(f).get("v1", {})
    except (OSError, ValueError):
        return None
while True:
    res = load("/run/cloud-init/result.json")
    if res is not None:
        status, doc = ("error" if res.get("errors") else "done"), {"v1": res}
        break
    st = load("/run/cloud-init/status.json") or {}
    errors = [e for v in st.values() if isinstance(v, dict) for e in v.get("errors") or []]
    if errors:
        status, doc = "error", {"v1": {"datasource": st.get("datasource"), "errors": errors}}
        break
    time.sleep(1)
print(status, base64.b64encode(json.dumps(doc).encode()).decode())
IMAGEKIT_PY
)
STATUS=${OUT%% *}
RESULT=${OUT#* }
[ -n "$OUT" ] || { STATUS=unknown; RESULT=; }
say "IMAGEKIT""-RESULT $N status=$STATUS result=$RESULT"
[ "$MODE" = provision ] || exit 0
[ "$STATUS" = done ] || exit 0
say "IMAGEKIT""-GENERALISING $N"
rc=0
if cloud-init clean --help 2>/dev/null | grep -q -e --machine-id; then
  cloud-init clean --logs --machine-id --seed || rc=1
else
  cloud-init clean --logs --seed || rc=1
fi
# an empty machine-id is "uninitialised": systemd makes a new one at the next boot
rm -f /etc/machine-id && : > /etc/machine-id && chmod 0444 /etc/machine-id || rc=1
[ -L /var/lib/dbus/machine-id ] || rm -f /var/lib/dbus/machine-id
rm -f /etc/ssh/ssh_host_*key /etc/ssh/ssh_host_*key.pub /etc/ssh/ssh_host_*key-cert.pub
command -v apt-get >/dev/null 2>&1 && apt-get clean
command -v dnf >/dev/null 2>&1 && dnf clean all >/dev/null 2>&1
command -v yum >/dev/null 2>&1 && yum clean all >/dev/null 2>&1
rm -f /root/.bash_history /home/*/.bash_history
rm -f /var/lib/dhcp/*.leases /var/lib/dhclient/*.lease* /var/lib/NetworkManager/*.lease
rm -rf /var/lib/cloud/instances /var/lib/cloud/instance
# the journal: written to /run until the next boot (--relinquish-var), so that the persistent one,
# named after the old machine-id, can go
command -v journalctl >/dev/null 2>&1 && journalctl --relinquish-var >/dev/null 2>&1
rm -rf /var/log/journal/*
find /var/log -type f \( -name '*.gz' -o -name '*.[0-9]' -o -name '*.old' -o -name '*.journal~' \) -delete 2>/dev/null
find /var/log -type f -exec truncate -s 0 {} + 2>/dev/null
sync
say "IMAGEKIT""-GENERALISED $N rc=$rc"
"""

_BOOTHOOK = """#cloud-boothook
#!/bin/sh
# imagekit snapshot reporter: see imagekit/snapshot/userdata.py
mkdir -p /run/imagekit
cat > /run/imagekit/report-@NONCE@.sh <<'IMAGEKIT_EOF'
@SCRIPT@IMAGEKIT_EOF
chmod 0700 /run/imagekit/report-@NONCE@.sh
if command -v systemd-run >/dev/null 2>&1; then
  systemd-run --no-block --unit=imagekit-report-@NONCE@ --description="imagekit snapshot reporter" \\
    /bin/sh /run/imagekit/report-@NONCE@.sh >/dev/null 2>&1
else
  (setsid /bin/sh /run/imagekit/report-@NONCE@.sh >/dev/null 2>&1 &)
fi
for t in /dev/ttyS0 /dev/hvc0 /dev/ttyAMA0; do
  [ -c "$t" ] && printf '%s\\n' "IMAGEKIT""-STARTED @NONCE@" > "$t" 2>/dev/null
done
exit 0
"""


@dataclass(frozen=True)
class Script:
    """One provisioning script: its name (for messages and its order) and its text."""

    name: str
    text: str


@dataclass(frozen=True)
class UserData:
    """The composed user-data and the nonce its reporter marks the console with."""

    text: str
    nonce: str
    mode: Mode

    @property
    def size(self) -> int:
        return len(self.text.encode())


def new_nonce() -> str:
    return secrets.token_hex(8)


def reporter(nonce: str, mode: Mode) -> str:
    """The reporter boot hook (see the module documentation)."""
    script = _SCRIPT.replace("@NONCE@", nonce).replace("@MODE@", mode)
    return _BOOTHOOK.replace("@SCRIPT@", script).replace("@NONCE@", nonce)


def part_type(text: str) -> str:
    """The MIME type of one user-data part, from its first line; UsageError when cloud-init would not know it."""
    head = text.lstrip("\ufeff")
    if head.startswith("Content-Type:") or head.startswith("MIME-Version:"):
        return "multipart/mixed"
    for prefix, mime in _PART_TYPES:
        if head.startswith(prefix):
            return mime
    first = head.splitlines()[0][:60] if head.strip() else "(empty)"
    raise UsageError(f"user-data starting with {first!r} is not a kind cloud-init runs",
                     "user-data starts with #cloud-config, #! (a script), #cloud-boothook, #include "
                     "or is a MIME multi-part document")


def _text_part(text: str, mime: str, filename: str) -> Message:
    subtype = mime.split("/", 1)[1]
    part = email.mime.text.MIMEText(text, subtype, "utf-8")
    part.add_header("Content-Disposition", "attachment", filename=filename)
    return part


def _packages_part(packages: Sequence[str]) -> Message:
    doc = {"packages": list(packages),
           # append to the lists of the caller's own #cloud-config instead of replacing them
           "merge_how": [{"name": "list", "settings": ["append"]},
                         {"name": "dict", "settings": ["no_replace", "recurse_list"]}]}
    return _text_part("#cloud-config\n" + json.dumps(doc, indent=1) + "\n", "text/cloud-config",
                      "imagekit-packages.cfg")


def compose(user_data: str | None = None, packages: Sequence[str] = (), scripts: Sequence[Script] = (), *,
            mode: Mode = "provision", nonce: str | None = None) -> UserData:
    """The user-data document (see the module documentation)."""
    nonce = nonce or new_nonce()
    doc = email.mime.multipart.MIMEMultipart()
    doc.attach(_text_part(reporter(nonce, mode), "text/cloud-boothook", "imagekit-reporter.sh"))
    if user_data is not None and user_data.strip():
        mime = part_type(user_data)
        if mime == "multipart/mixed":
            doc.attach(Parser().parsestr(user_data))
        else:
            doc.attach(_text_part(user_data, mime, "user-data"))
    if packages:
        doc.attach(_packages_part(packages))
    for i, script in enumerate(scripts, 1):
        text = script.text if script.text.startswith("#!") else "#!/bin/sh\nset -e\n" + script.text
        doc.attach(_text_part(text, "text/x-shellscript", f"imagekit-{i:02d}-{_safe(script.name)}"))
    return UserData(doc.as_string(), nonce, mode)


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in name)[:40] or "script"

"""Drive wrk (a C load generator, `apt-get install wrk`) against the server and read back its numbers.

Every text request carries a text of its own (the Lua script counts per thread), so the
server's text cache never answers. Statuses are counted per code, so 503s (admission) and
other errors are told apart; wrk's socket errors (connect, read, write, timeout) come back too.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from pathlib import Path

COMMON = r"""
local threads = {}
local next_id = 1
function setup(thread)
  thread:set("id", next_id)
  next_id = next_id + 1
  table.insert(threads, thread)
end
function init(args)
  statuses = {}
  counter = 0
end
function response(status, headers, body)
  local key = tostring(status)
  statuses[key] = (statuses[key] or 0) + 1
end
function done(summary, latency, requests)
  local agg = {}
  for _, t in ipairs(threads) do
    for k, v in pairs(t:get("statuses")) do agg[k] = (agg[k] or 0) + v end
  end
  local parts = {}
  for k, v in pairs(agg) do table.insert(parts, string.format('"%s": %d', k, v)) end
  local e = summary.errors
  io.write(string.format('WRKJSON {"requests": %d, "duration_us": %d, "p50_us": %d, "p90_us": %d, "p99_us": %d, ' ..
    '"max_us": %d, "statuses": {%s}, "socket_errors": {"connect": %d, "read": %d, "write": %d, "timeout": %d}}\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency.max, table.concat(parts, ", "), e.connect, e.read, e.write, e.timeout))
end
"""

TEXT = COMMON + r"""
local words = {"red", "blue", "green", "yellow"}
local shapes = {"circle", "square", "star", "triangle"}
function request()
  counter = counter + 1
  local path = string.format("/search?k=10&text=a%%20%s%%20%s%%20left%%20of%%20a%%20%s%%20t%dq%d",
    words[counter % 4 + 1], shapes[math.floor(counter / 4) % 4 + 1], shapes[math.floor(counter / 16) % 4 + 1],
    id, counter)
  return wrk.format("GET", path)
end
"""

UPLOAD = COMMON + r"""
local f = assert(io.open("{body}", "rb"))
local body = f:read("*all")
f:close()
local headers = {["Content-Type"] = "{ctype}"}
function request()
  return wrk.format("POST", "{path}", headers, body)
end
"""

THUMBNAILS = COMMON + r"""
function request()
  counter = counter + 1
  -- items spread over the index so that most thumbnails are not cached yet
  local item = ((counter * 7919 + id * 104729) % {count}) + 1
  return wrk.format("GET", string.format("/items/%d/thumbnail", item))
end
"""


def available() -> bool:
    return shutil.which("wrk") is not None


def multipart(data: bytes, name: str = "q.png", ctype: str = "image/png") -> bytes:
    return (b"--wrkboundary\r\nContent-Disposition: form-data; name=\"file\"; filename=\"" + name.encode()
            + b"\"\r\nContent-Type: " + ctype.encode() + b"\r\n\r\n" + data + b"\r\n--wrkboundary--\r\n")


def run(url: str, script: str, connections: int, seconds: float, threads: int = 1, timeout_s: float = 10) -> dict:
    """One wrk run; returns requests/s, latency percentiles in ms, statuses and socket errors."""
    with tempfile.TemporaryDirectory() as tmp:
        lua = Path(tmp) / "script.lua"
        lua.write_text(script)
        cmd = ["wrk", f"-t{min(threads, connections)}", f"-c{connections}", f"-d{seconds:g}s",
               f"--timeout={timeout_s:g}s", "-s", str(lua), url]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60)
    line = next((x for x in out.stdout.splitlines() if x.startswith("WRKJSON ")), None)
    if line is None:
        raise RuntimeError(f"wrk gave no result: {out.stdout[-2000:]} {out.stderr[-2000:]}")
    r = json.loads(line[len("WRKJSON "):])
    statuses = {int(k): v for k, v in r["statuses"].items()}
    ok = sum(v for k, v in statuses.items() if 200 <= k < 300)
    return {"connections": connections, "seconds": seconds, "requests": r["requests"],
            "req_s": r["requests"] / (r["duration_us"] / 1e6), "ok": ok,
            "ok_s": ok / (r["duration_us"] / 1e6), "p50_ms": r["p50_us"] / 1000, "p90_ms": r["p90_us"] / 1000,
            "p99_ms": r["p99_us"] / 1000, "max_ms": r["max_us"] / 1000, "statuses": statuses,
            "socket_errors": r["socket_errors"]}


def text_script() -> str:
    return TEXT


def upload_script(body_file: Path, path: str = "/search/image?k=10",
                  ctype: str = "multipart/form-data; boundary=wrkboundary") -> str:
    """POST the same body again and again (`ctype`: multipart as `multipart()` makes it, or JSON)."""
    return UPLOAD.replace("{body}", str(body_file)).replace("{path}", path).replace("{ctype}", ctype)


def thumbnail_script(count: int) -> str:
    """GET /items/ID/thumbnail over ids 1..count, few of them twice (uncached renders)."""
    return THUMBNAILS.replace("{count}", str(count))

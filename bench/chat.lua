-- wrk script: non-streaming POST /v1/chat/completions with the ~1.2 KB body of bench/request.json.
--
--   BENCH_BODY=bench/request.json BENCH_KEY=sk-... wrk -t1 -c32 -d10s --latency \
--       -s bench/chat.lua http://127.0.0.1:8080/v1/chat/completions
--
-- BENCH_BODY: path of the JSON body (default bench/request.json)
-- BENCH_KEY:  sent as "Authorization: Bearer ..." when set
-- At the end it prints one line "BENCH_JSON {...}" with the exact numbers (latencies in
-- microseconds), which bench/run.py parses instead of wrk's rounded text.

local path = os.getenv("BENCH_BODY") or "bench/request.json"
local f = assert(io.open(path, "rb"), "cannot open " .. path)
local body = f:read("*a")
f:close()

wrk.method = "POST"
wrk.body = body
wrk.headers["Content-Type"] = "application/json"
local key = os.getenv("BENCH_KEY")
if key and key ~= "" then
  wrk.headers["Authorization"] = "Bearer " .. key
end

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH_JSON {"requests": %d, "duration_us": %d, "bytes": %d, '
      .. '"errors": {"connect": %d, "read": %d, "write": %d, "status": %d, "timeout": %d}, '
      .. '"latency_us": {"mean": %.1f, "stdev": %.1f, "min": %d, "max": %d, '
      .. '"p50": %d, "p90": %d, "p99": %d, "p999": %d}}\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency.mean, latency.stdev, latency.min, latency.max,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency:percentile(99.9)))
end

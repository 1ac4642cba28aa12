-- The suite's wrk script. BENCH_METHOD=POST sends a JSON body of BENCH_BODY_BYTES (1024) bytes.
-- done() prints one line, "BENCH_RESULT {json}", with the counts and latency percentiles in µs.
local method = os.getenv("BENCH_METHOD") or "GET"
local body_bytes = tonumber(os.getenv("BENCH_BODY_BYTES") or "1024")

if method == "POST" then
  local head, tail = '{"prompt":"', '"}'
  wrk.method = "POST"
  wrk.headers["Content-Type"] = "application/json"
  wrk.body = head .. string.rep("x", body_bytes - #head - #tail) .. tail
end

function done(summary, latency, requests)
  local errors = summary.errors
  io.write(string.format(
    'BENCH_RESULT {"requests":%d,"duration_us":%d,"bytes":%d,"connect_errors":%d,"read_errors":%d,' ..
    '"write_errors":%d,"status_errors":%d,"timeouts":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,' ..
    '"p999_us":%d,"max_us":%d,"mean_us":%.1f}\n',
    summary.requests, summary.duration, summary.bytes, errors.connect, errors.read, errors.write,
    errors.status, errors.timeout, latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency:percentile(99.9), latency.max, latency.mean))
end

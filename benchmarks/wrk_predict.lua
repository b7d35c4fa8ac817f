-- wrk script for benchmarks/serving.py: POST /predict with the dev pairs in turn (one JSON body per line of
-- $BODIES), then one JSON line. Run with one wrk thread (-t1). `done` runs in the main Lua state, so it reads
-- the thread's counters (globals there) through the thread object.
sent, answered, failed = 0, 0, 0
local bodies = {}
for line in io.lines(os.getenv("BODIES")) do bodies[#bodies + 1] = line end
local headers = {["Content-Type"] = "application/json"}
local threads = {}

setup = function(thread)
  threads[#threads + 1] = thread
end

request = function()
  sent = sent + 1
  return wrk.format("POST", "/predict", headers, bodies[(sent - 1) % #bodies + 1])
end

response = function(status, headers, body)
  answered = answered + 1
  if status ~= 200 then failed = failed + 1 end
end

done = function(summary, latency, requests)
  local e, t = summary.errors, threads[1]
  io.write(string.format(
    '{"requests": %d, "seconds": %.4f, "errors": %d, "p50_ms": %.3f, "p99_ms": %.3f}\n',
    t:get("answered"), summary.duration / 1e6, t:get("failed") + e.connect + e.read + e.write + e.timeout,
    latency:percentile(50) / 1000, latency:percentile(99) / 1000))
end

-- wrk script: POST the review in $SIDEKEY_BENCH_BODY; with SIDEKEY_BENCH_CLOSE=1, a new
-- connection (and TLS handshake) per request. $SIDEKEY_BENCH_WORKLOAD picks the annotation sets:
--   same      every review the same (a Deployment's pods: the injector's decision memory helps);
--   distinct  every review with annotations of its own (the token SIDEKEY-BENCH-N in the body,
--             which names a secret and its template, replaced by a number no review repeats);
--   mix       four reviews in five from seven Deployments' annotation sets, one in five distinct.
local f = assert(io.open(os.getenv("SIDEKEY_BENCH_BODY"), "rb"))
local body = f:read("*a")
f:close()
wrk.method = "POST"
wrk.body = body
wrk.headers["Content-Type"] = "application/json"
if os.getenv("SIDEKEY_BENCH_CLOSE") == "1" then
  wrk.headers["Connection"] = "close"
end

local workload = os.getenv("SIDEKEY_BENCH_WORKLOAD") or "same"
local counter = 0
if workload ~= "same" then
  request = function()
    counter = counter + 1
    local n
    if workload == "mix" and counter % 5 ~= 0 then
      n = "deployment-" .. (counter % 7)
    else
      n = "review-" .. counter .. "-" .. math.random(1000000000)
    end
    return wrk.format(nil, nil, nil, (body:gsub("SIDEKEY%-BENCH%-N", n)))
  end
end

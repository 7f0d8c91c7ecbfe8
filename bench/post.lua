-- wrk script: POST the review in $SIDEKEY_BENCH_BODY; with SIDEKEY_BENCH_CLOSE=1, a new
-- connection (and TLS handshake) per request.
local f = assert(io.open(os.getenv("SIDEKEY_BENCH_BODY"), "rb"))
wrk.method = "POST"
wrk.body = f:read("*a")
f:close()
wrk.headers["Content-Type"] = "application/json"
if os.getenv("SIDEKEY_BENCH_CLOSE") == "1" then
  wrk.headers["Connection"] = "close"
end

// bench_setup: bench-only glue for running Haraka beside e2a on one machine (bench/peers.py).
//
// Why it exists:
//  * the bench's DNS zone (SPF, DKIM key, DMARC for the sender domain) is served on a random
//    loopback port; Node resolves through /etc/resolv.conf, so point node:dns at that port;
//  * e2a and the Python peer cache DNS answers within their TTL; Node does not, so cache
//    TXT/A/MX answers (and NXDOMAIN) for the zone's TTL (300 s) to give Haraka the same deal;
//  * haraka-plugin-spf skips clients on loopback/private addresses (connection.remote.is_private)
//    and has no setting to check them anyway; every bench client is 127.0.0.1, so mark the
//    remote as not private, which makes the SPF plugin check 127.0.0.1 like any client.
// Settings: config/bench.ini  [dns] server=127.0.0.1:PORT  ttl=300
const dns = require('node:dns')

exports.register = function () {
  const cfg = this.config.get('bench.ini').dns || {}
  const server = cfg.server
  const ttl_ms = 1000 * (parseInt(cfg.ttl, 10) || 300)
  if (server) {
    dns.setServers([server])
    dns.promises.setServers([server])
  }
  const cache = new Map()
  for (const fn of ['resolveTxt', 'resolve4', 'resolve6', 'resolveMx', 'resolve']) {
    const orig = dns.promises[fn].bind(dns.promises)
    dns.promises[fn] = function (name, ...rest) {
      const key = `${fn} ${String(name).toLowerCase()} ${rest.join(' ')}`
      const hit = cache.get(key)
      const now = Date.now()
      if (hit && hit.expires > now) return hit.promise
      const promise = orig(name, ...rest)
      cache.set(key, { expires: now + ttl_ms, promise })
      promise.catch(() => {}) // negative answers are cached too; callers see the rejection
      return promise
    }
  }
  this.register_hook('connect_init', 'not_private')
}

exports.not_private = function (next, connection) {
  connection.remote.is_private = false
  next()
}

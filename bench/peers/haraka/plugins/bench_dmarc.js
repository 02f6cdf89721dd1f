// bench_dmarc: a small DMARC (RFC 7489) check for the bench, since npm has no maintained
// Haraka DMARC plugin. Runs in data_post after haraka-plugin-dkim (list it after "dkim").
//
// Pass = SPF (mfrom) passed for a domain aligned with the RFC5322.From domain, or a DKIM
// signature passed for an aligned d=. Alignment is relaxed (same organisational domain,
// approximated as the last two labels: enough for the bench zone, not a public-suffix list).
// The policy comes from _dmarc.<From domain> (falling back to the organisational domain);
// a failure under p=reject is refused with 550, p=quarantine/none just recorded.
// The verdict goes into Authentication-Results (Haraka rebuilds that header after data_post),
// which is what bench/peers.py reads back from the stored message.
const dns = require('node:dns')

function org(domain) {
  return domain.split('.').slice(-2).join('.')
}
function aligned(a, b) {
  return !!a && !!b && org(a.toLowerCase()) === org(b.toLowerCase())
}
async function policy(domain) {
  for (const name of [domain, org(domain)]) {
    try {
      const rrs = await dns.promises.resolveTxt(`_dmarc.${name}`)
      for (const rr of rrs) {
        const txt = rr.join('')
        if (/^v=DMARC1\s*;/i.test(txt)) {
          const p = /(?:^|;)\s*p\s*=\s*(\w+)/i.exec(txt)
          return p ? p[1].toLowerCase() : 'none'
        }
      }
    } catch (err) {
      if (!['ENOTFOUND', 'ENODATA', 'NXDOMAIN'].includes(err.code)) throw err
    }
    if (name === org(domain)) break
  }
  return null
}

exports.register = function () {
  this.register_hook('data_post', 'dmarc_check')
}

exports.dmarc_check = async function (next, connection) {
  const txn = connection.transaction
  if (!txn) return next()
  const from = txn.header.get_decoded('From') || ''
  const m = /@([A-Za-z0-9.-]+)/.exec(from)
  if (!m) {
    connection.auth_results('dmarc=permerror (no From domain)')
    return next(DENY, 'DMARC: no RFC5322.From domain')
  }
  const fromDomain = m[1].toLowerCase().replace(/\.$/, '')
  let p
  try {
    p = await policy(fromDomain)
  } catch (err) {
    connection.auth_results(`dmarc=temperror header.from=${fromDomain}`)
    return next(DENYSOFT, 'DMARC: DNS error')
  }
  if (p === null) {
    connection.auth_results(`dmarc=none header.from=${fromDomain}`)
    return next()
  }
  const spf = txn.results.get('spf') || {}
  const dkim = txn.results.get('dkim') || {}
  const spfOk = spf.scope === 'mfrom' && spf.result === 'Pass' && aligned(spf.domain, fromDomain)
  const dkimOk = (dkim.pass || []).some((d) => aligned(d, fromDomain))
  if (spfOk || dkimOk) {
    connection.auth_results(`dmarc=pass header.from=${fromDomain}`)
    txn.results.add(this, { pass: fromDomain })
    return next()
  }
  connection.auth_results(`dmarc=fail header.from=${fromDomain}`)
  txn.results.add(this, { fail: fromDomain })
  if (p === 'reject') return next(DENY, 'DMARC policy rejects this message')
  next()
}

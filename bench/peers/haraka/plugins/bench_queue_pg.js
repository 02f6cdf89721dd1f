// bench_queue_pg: queue variant 2 — one INSERT (autocommit) of the message (with Haraka's
// added headers) into PostgreSQL through node-postgres; 250 only after the commit.
// Settings: config/bench.ini [pg] host (a socket directory or a name), port, user, database,
// pool_size (e2a's default pool is 10).
const { Pool } = require('pg')

const TABLE = 'bench_haraka_messages'
// @haraka/email-address: .address is a property in 3.x, a method in older releases.
const addr = (a) => (typeof a.address === 'function' ? a.address() : a.address)

exports.register = function () {
  const cfg = this.config.get('bench.ini').pg || {}
  this.pool = new Pool({
    host: cfg.host,
    port: parseInt(cfg.port, 10) || 5432,
    user: cfg.user,
    database: cfg.database,
    max: parseInt(cfg.pool_size, 10) || 10,
  })
  this.ready = this.pool.query(
    `CREATE TABLE IF NOT EXISTS ${TABLE} (id BIGSERIAL PRIMARY KEY, mail_from TEXT NOT NULL,` +
      ' rcpt TEXT NOT NULL, raw BYTEA NOT NULL, received_at TIMESTAMPTZ NOT NULL DEFAULT now())',
  )
  this.ready.catch((err) => this.logerror(`cannot create ${TABLE}: ${err.message}`))
}

exports.hook_queue = function (next, connection) {
  const txn = connection.transaction
  txn.message_stream.get_data({ line_endings: '\r\n' }, (raw) => {
    this.ready
      .then(() =>
        this.pool.query(`INSERT INTO ${TABLE} (mail_from, rcpt, raw) VALUES ($1, $2, $3)`, [
          addr(txn.mail_from),
          txn.rcpt_to.map(addr).join(','),
          raw,
        ]),
      )
      .then(
        () => next(OK, 'queued to PostgreSQL'),
        (err) => {
          connection.logerror(this, err.message)
          next(DENYSOFT, 'queue: database error')
        },
      )
  })
}

exports.shutdown = function () {
  if (this.pool) this.pool.end()
}

// bench_queue_file: queue variant 1 — the message (with Haraka's added headers) is written
// to one file per message under the directory of config/bench.ini [queue] dir, fsync'd, and
// only then answered 250. Haraka's own queue/* plugins either forward or do not fsync.
const fs = require('node:fs')
const path = require('node:path')

exports.register = function () {
  this.dir = (this.config.get('bench.ini').queue || {}).dir
  fs.mkdirSync(this.dir, { recursive: true })
}

exports.hook_queue = function (next, connection) {
  const txn = connection.transaction
  const file = path.join(this.dir, `${txn.uuid}.eml`)
  fs.open(file, 'w', (err, fd) => {
    if (err) return next(DENYSOFT, 'queue: cannot open file')
    const ws = fs.createWriteStream(null, { fd, autoClose: false })
    ws.on('error', () => fs.close(fd, () => next(DENYSOFT, 'queue: write failed')))
    ws.on('finish', () => {
      fs.fsync(fd, (err2) => {
        fs.close(fd, () => (err2 ? next(DENYSOFT, 'queue: fsync failed') : next(OK, 'queued to file')))
      })
    })
    txn.message_stream.pipe(ws, { line_endings: '\r\n' })
  })
}

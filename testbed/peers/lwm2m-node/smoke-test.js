#!/usr/bin/env node
'use strict';

// Self-contained smoke test of server.js against lwm2m-node-lib's own LwM2M client plus
// a hand-made raw CoAP device. Exits 0 on success, 1 on failure, always within
// OVERALL_TIMEOUT_MS. Run: `node smoke-test.js` (after `npm ci`).

const { spawn } = require('child_process');
const dgram = require('dgram');
const fs = require('fs');
const path = require('path');
const readline = require('readline');

const OVERALL_TIMEOUT_MS = 45000;
const REQUEST_TIMEOUT_MS = 1500;
const HOST = '127.0.0.1';

const patches = require('./coap-patches');
patches.bindAllSocketsTo(HOST); // the lib client below must not bind 0.0.0.0 either
const pkt = patches.requireFromLib('coap-packet');
const logger = patches.requireFromLib('logops');
logger.setStream(process.stderr);
logger.setLevel('FATAL');
process.removeAllListeners('warning'); // mongoose circular-dependency noise on Node >= 14
const client = require('lwm2m-node-lib').client;

let child = null;
let failed = false;

function log(msg) {
  process.stdout.write(msg + '\n');
}

function fail(msg) {
  if (failed) return;
  failed = true;
  log('FAIL: ' + msg);
  if (child && child.exitCode === null) child.kill('SIGKILL');
  process.exit(1);
}

const watchdog = setTimeout(() => fail(`overall timeout ${OVERALL_TIMEOUT_MS} ms`), OVERALL_TIMEOUT_MS);

function assert(cond, msg) {
  if (!cond) throw new Error('assertion failed: ' + msg);
  log('ok - ' + msg);
}

function promisify(fn, ...args) {
  return new Promise((resolve, reject) => fn(...args, (e, r) => (e ? reject(e) : resolve(r))));
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

// ----------------------------------------------------------------------------------
// Driver process
// ----------------------------------------------------------------------------------

const lines = []; // every protocol line received, in order
const waiters = [];

function startDriver() {
  child = spawn(process.execPath,
    [path.join(__dirname, 'server.js'), '--host', HOST, '--port', '0', '--request-timeout-ms', String(REQUEST_TIMEOUT_MS)],
    { stdio: ['pipe', 'pipe', 'inherit'] });
  child.on('error', (e) => fail('spawn: ' + e.message));
  readline.createInterface({ input: child.stdout }).on('line', (line) => {
    let msg;
    try {
      msg = JSON.parse(line);
    } catch (e) {
      fail('driver wrote a non-JSON line to stdout: ' + line);
      return;
    }
    log('   << ' + line);
    const w = waiters.find((x) => x.pred(msg));
    if (w) {
      waiters.splice(waiters.indexOf(w), 1);
      clearTimeout(w.timer);
      w.resolve(msg);
    } else {
      lines.push(msg);
    }
  });
}

function waitFor(pred, what, ms = 5000) {
  const i = lines.findIndex(pred);
  if (i >= 0) return Promise.resolve(lines.splice(i, 1)[0]);
  return new Promise((resolve, reject) => {
    const w = { pred, resolve };
    w.timer = setTimeout(() => {
      waiters.splice(waiters.indexOf(w), 1);
      reject(new Error('timed out waiting for ' + what));
    }, ms);
    waiters.push(w);
  });
}

let nextId = 1;
function command(cmd, ms = 5000) {
  const id = nextId++;
  const line = JSON.stringify(Object.assign({ id }, cmd));
  log('   >> ' + line);
  child.stdin.write(line + '\n');
  return waitFor((m) => m.id === id, 'reply to ' + line, ms);
}

function rawCommand(text, ms = 5000) {
  log('   >> ' + text);
  child.stdin.write(text + '\n');
  return waitFor((m) => m.id === null && m.ok === false, 'error reply to ' + text, ms);
}

// ----------------------------------------------------------------------------------
// Which sockets does the driver process hold? (Linux /proc)
// ----------------------------------------------------------------------------------

function hexToAddr(hex) {
  if (hex.length === 8) {
    return [3, 2, 1, 0].map((i) => parseInt(hex.substr(i * 2, 2), 16)).join('.');
  }
  // IPv6: four little-endian 32-bit words
  const words = [];
  for (let w = 0; w < 4; w++) {
    const chunk = hex.substr(w * 8, 8);
    words.push(chunk.substr(6, 2) + chunk.substr(4, 2) + chunk.substr(2, 2) + chunk.substr(0, 2));
  }
  const full = words.join('');
  const groups = [];
  for (let g = 0; g < 8; g++) groups.push(full.substr(g * 4, 4));
  return groups.join(':').toLowerCase();
}

function inetSocketsOf(pid) {
  if (!fs.existsSync('/proc/net/udp')) return null;
  const inodes = new Set();
  for (const fd of fs.readdirSync(`/proc/${pid}/fd`)) {
    try {
      const m = /^socket:\[(\d+)\]$/.exec(fs.readlinkSync(`/proc/${pid}/fd/${fd}`));
      if (m) inodes.add(m[1]);
    } catch (e) { /* fd closed meanwhile */ }
  }
  const found = [];
  for (const proto of ['udp', 'udp6', 'tcp', 'tcp6']) {
    let text;
    try {
      text = fs.readFileSync('/proc/net/' + proto, 'utf8');
    } catch (e) {
      continue;
    }
    for (const row of text.split('\n').slice(1)) {
      const f = row.trim().split(/\s+/);
      if (f.length < 10 || !inodes.has(f[9])) continue;
      const [addrHex, portHex] = f[1].split(':');
      found.push({ proto, address: hexToAddr(addrHex), port: parseInt(portHex, 16) });
    }
  }
  return found;
}

function assertLoopbackOnly(when) {
  const socks = inetSocketsOf(child.pid);
  if (socks === null) {
    log('skip - /proc not available, cannot list sockets ' + when);
    return;
  }
  const desc = socks.map((s) => `${s.proto} ${s.address}:${s.port}`).join(', ');
  assert(socks.length > 0 && socks.every((s) => s.address === HOST),
    `every socket of the driver is bound to ${HOST} ${when} [${desc}]`);
}

// ----------------------------------------------------------------------------------
// A raw CoAP "device": what nidd-bridge's per-device sockets will carry
// ----------------------------------------------------------------------------------

function rawDevice() {
  const sock = dgram.createSocket('udp4');
  const inbox = [];
  const rwaiters = [];
  sock.on('message', (msg) => {
    let p;
    try {
      p = pkt.parse(msg);
    } catch (e) {
      return;
    }
    const w = rwaiters.find((x) => x.pred(p));
    if (w) {
      rwaiters.splice(rwaiters.indexOf(w), 1);
      clearTimeout(w.timer);
      w.resolve(p);
    } else {
      inbox.push(p);
    }
  });
  return {
    sock,
    bind: () => new Promise((r) => sock.bind(0, HOST, r)),
    port: () => sock.address().port,
    send: (packet, port) => sock.send(pkt.generate(packet), port, HOST),
    next(pred, what, ms = 3000) {
      const i = inbox.findIndex(pred);
      if (i >= 0) return Promise.resolve(inbox.splice(i, 1)[0]);
      return new Promise((resolve, reject) => {
        const w = { pred, resolve };
        w.timer = setTimeout(() => {
          rwaiters.splice(rwaiters.indexOf(w), 1);
          reject(new Error('raw device: timed out waiting for ' + what));
        }, ms);
        rwaiters.push(w);
      });
    },
    close: () => sock.close(),
  };
}

const uriPath = (p) => '/' + p.options.filter((o) => o.name === 'Uri-Path').map((o) => o.value.toString()).join('/');

// ----------------------------------------------------------------------------------
// The test
// ----------------------------------------------------------------------------------

async function main() {
  startDriver();
  const listening = await waitFor((m) => m.event === 'listening', 'listening event');
  assert(listening.host === HOST && Number.isInteger(listening.port) && listening.port > 0,
    `driver listens on ${listening.host}:${listening.port}`);
  const port = listening.port;
  assertLoopbackOnly('after start');

  // --- bad input never kills the driver ----------------------------------------------
  let r = await rawCommand('this is not json');
  assert(r.ok === false && r.kind === 'bad_request', 'garbage line -> bad_request error');
  r = await command({ op: 'no-such-op' });
  assert(r.ok === false && r.kind === 'bad_request', 'unknown op -> bad_request error');
  r = await command({ op: 'read', endpoint: 'x', path: '/3/zero' });
  assert(r.ok === false && r.kind === 'bad_request', 'bad path -> bad_request error');
  r = await command({ op: 'ping' });
  assert(r.ok === true && r.result === 'pong', 'still alive (ping)');

  // --- lwm2m-node-lib client --------------------------------------------------------
  const EP = 'urn:nai:smoke-client@nidd.test';
  client.init({
    client: {
      lifetime: '300', version: '1.1', logLevel: 'FATAL', observe: { period: 3000 },
      ipProtocol: 'udp4', serverProtocol: 'udp4',
      formats: [{ name: 'lightweightm2m/text', value: 1541 }], writeFormat: 'lightweightm2m/text',
    },
  });
  await promisify(client.registry.create, '/3/0');
  await promisify(client.registry.setResource, '/3/0', '0', 'Open Mobile Alliance');
  await promisify(client.registry.setResource, '/3/0', '13', '1000');
  const dev = await promisify(client.register, HOST, port, null, EP);
  const reg = await waitFor((m) => m.event === 'registration' && m.endpoint === EP, 'registration of ' + EP);
  assert(reg.address === HOST && reg.port === dev.localPort,
    `registration event carries the client's source address ${reg.address}:${reg.port}`);
  assert(reg.location === dev.location && /^rd\/\d+$/.test(reg.location), `location ${reg.location}`);
  assert(reg.lwm2m === '1.1' && reg.binding === 'U' && reg.lifetime === 300, 'lwm2m/binding/lifetime reported');

  r = await command({ op: 'list' });
  const listed = r.ok && r.result.find((d) => d.endpoint === EP);
  assert(listed && listed.address === HOST && listed.port === dev.localPort, 'list shows the endpoint with its address/port');

  r = await command({ op: 'read', endpoint: EP, path: '/3/0/0' });
  assert(r.ok === true && r.result === 'Open Mobile Alliance', 'read /3/0/0 -> "Open Mobile Alliance"');

  r = await command({ op: 'write', endpoint: EP, path: '/3/0/14', value: '+02' });
  assert(r.ok === true, 'write /3/0/14 "+02"');
  r = await command({ op: 'read', endpoint: EP, path: '/3/0/14' });
  assert(r.ok === true && r.result === '+02', 'read back /3/0/14 -> "+02"');

  r = await command({ op: 'read', endpoint: EP, path: '/3/0/7' });
  assert(r.ok === false && r.kind === 'coap_error' && r.code === '4.04', 'read of a missing resource -> coap_error 4.04');

  r = await command({ op: 'discover', endpoint: EP, path: '/3/0' });
  assert(r.ok === true && r.result.includes('</3/0/0>'), 'discover /3/0 -> link format');

  r = await command({ op: 'execute', endpoint: EP, path: '/3/0/4' });
  assert(r.ok === true, 'execute /3/0/4');

  r = await command({ op: 'observe', endpoint: EP, path: '/3/0/13' });
  assert(r.ok === true && r.result === '1000', 'observe /3/0/13 -> first value "1000"');
  await promisify(client.registry.setResource, '/3/0', '13', '2000');
  const note = await waitFor((m) => m.event === 'notification' && m.endpoint === EP, 'notification');
  assert(note.path === '/3/0/13' && note.value === '2000', 'notification /3/0/13 -> "2000"');
  r = await command({ op: 'cancel', endpoint: EP, path: '/3/0/13' });
  assert(r.ok === true, 'cancel observation');

  const t0 = Date.now();
  r = await command({ op: 'read', endpoint: 'urn:nai:nobody@nidd.test', path: '/3/0/0' });
  assert(r.ok === false && r.kind === 'unknown_endpoint' && Date.now() - t0 < 1000, 'read of an unknown endpoint fails at once');

  // --- raw device: LwM2M 1.1 query over Non-IP binding, unanswered read ---------------
  const RAW = 'urn:nai:smoke-raw@nidd.test';
  const raw = rawDevice();
  await raw.bind();
  const mid = 1 + Math.floor(Math.random() * 60000); // see README: MID collisions
  raw.send({
    confirmable: true, code: '0.02', messageId: mid, token: Buffer.from('5e1f0001', 'hex'),
    options: [
      { name: 'Uri-Path', value: Buffer.from('rd') },
      ...['ep=' + RAW, 'lt=300', 'lwm2m=1.1', 'b=N', 'Q'].map((q) => ({ name: 'Uri-Query', value: Buffer.from(q) })),
      { name: 'Content-Format', value: Buffer.from([40]) },
    ],
    payload: Buffer.from('</1/0>,</3/0>'),
  }, port);
  const ack = await raw.next((p) => p.ack && p.messageId === mid && p.code !== '0.00', 'Register response');
  const locs = ack.options.filter((o) => o.name === 'Location-Path').map((o) => o.value.toString());
  assert(ack.code === '2.01' && locs.length === 1 && /^rd\/\d+$/.test(locs[0]),
    `Register with lwm2m=1.1&b=N&Q accepted: 2.01, one Location-Path "${locs[0]}"`);
  const rreg = await waitFor((m) => m.event === 'registration' && m.endpoint === RAW, 'registration of ' + RAW);
  assert(rreg.address === HOST && rreg.port === raw.port() && rreg.binding === 'N' && rreg.lwm2m === '1.1' &&
    rreg.params.Q === null && rreg.objects === '</1/0>,</3/0>', 'raw registration event: own source port, b=N, lwm2m=1.1, Q');

  const readP = command({ op: 'read', endpoint: RAW, path: '/3/0/0' }, REQUEST_TIMEOUT_MS + 3000);
  const get = await raw.next((p) => p.code === '0.01' && uriPath(p) === '/3/0/0', 'GET /3/0/0 at the raw device');
  const accept = get.options.find((o) => o.name === 'Accept');
  log(`info - server GET /3/0/0: ${get.confirmable ? 'CON' : 'NON'}, Accept ${accept ? accept.value.toString('hex') : 'absent'}`);
  assertLoopbackOnly('while a request is in flight');
  const t1 = Date.now();
  r = await readP;
  const took = Date.now() - t1;
  assert(r.ok === false && r.kind === 'timeout' && took < REQUEST_TIMEOUT_MS + 1000,
    `unanswered read -> timeout error after ~${REQUEST_TIMEOUT_MS} ms`);

  // a read the raw device answers, in TLV: the raw bytes come back in coap.payloadBase64
  const readTlv = command({ op: 'read', endpoint: RAW, path: '/3/0/1' });
  const get2 = await raw.next((p) => p.code === '0.01' && uriPath(p) === '/3/0/1', 'GET /3/0/1 at the raw device');
  const tlv = Buffer.from([0xc3, 0x01, 0x41, 0x42, 0x43]); // resource 1, value "ABC"
  raw.send({ ack: true, code: '2.05', messageId: get2.messageId, token: get2.token,
    options: [{ name: 'Content-Format', value: Buffer.from([0x2d, 0x16]) }], payload: tlv }, port);
  r = await readTlv;
  assert(r.ok === true && r.coap.contentFormat === 11542 && r.coap.payloadBase64 === tlv.toString('base64'),
    'TLV answer: coap.contentFormat 11542 and exact bytes in coap.payloadBase64');

  const delMid = (mid + 1) % 65536;
  raw.send({
    confirmable: true, code: '0.04', messageId: delMid, token: Buffer.from('5e1f0002', 'hex'),
    options: locs[0].split('/').map((s) => ({ name: 'Uri-Path', value: Buffer.from(s) })), payload: Buffer.alloc(0),
  }, port);
  const delAck = await raw.next((p) => p.ack && p.messageId === delMid && p.code !== '0.00', 'De-register response');
  const unreg = await waitFor((m) => m.event === 'unregistration' && m.endpoint === RAW, 'unregistration of ' + RAW);
  assert(delAck.code === '2.02' && unreg.reason === 'deregister', 'raw device De-register -> 2.02 + unregistration event');
  raw.close();

  // --- client de-registers ----------------------------------------------------------
  await promisify(client.unregister, dev);
  const cunreg = await waitFor((m) => m.event === 'unregistration' && m.endpoint === EP, 'unregistration of ' + EP);
  assert(cunreg.reason === 'deregister', 'lib client De-register -> unregistration event');
  r = await command({ op: 'list' });
  assert(r.ok === true && r.result.length === 0, 'list is empty again');

  // --- clean exit on stdin EOF ------------------------------------------------------
  const exited = new Promise((resolve) => child.on('exit', (code, sig) => resolve({ code, sig })));
  child.stdin.end();
  const ex = await Promise.race([exited, sleep(3000).then(() => null)]);
  assert(ex && ex.code === 0, 'driver exits with 0 on stdin EOF');

  clearTimeout(watchdog);
  log('PASS');
  process.exit(0);
}

main().catch((e) => fail(e && e.stack ? e.stack : String(e)));

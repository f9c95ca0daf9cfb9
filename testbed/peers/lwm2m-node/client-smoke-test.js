#!/usr/bin/env node
'use strict';

// Self-contained smoke test of client.js (the lwm2m-node-lib LwM2M client driver).
//  A. client.js registers straight at server.js (the lib's real server, no bridge); the
//     server reads /3/0/0 etc. through server.js's stdin protocol; Update; De-register.
//  B. client.js against a hand-made UDP "server" in this process, to pin down what the
//     client sends on the wire (Uri-Query, source ports, Content-Format, separate
//     responses) and that an unanswered Register ends in a bounded timeout reply.
// Exits 0 on success, 1 on failure, always within OVERALL_TIMEOUT_MS.
// Run: `node client-smoke-test.js` (after `npm ci`).

const { spawn } = require('child_process');
const dgram = require('dgram');
const fs = require('fs');
const path = require('path');
const readline = require('readline');

const OVERALL_TIMEOUT_MS = 60000;
const HOST = '127.0.0.1';

const patches = require('./coap-patches');
const pkt = patches.requireFromLib('coap-packet');

const children = [];
let failed = false;

function log(msg) {
  process.stdout.write(msg + '\n');
}

function fail(msg) {
  if (failed) return;
  failed = true;
  log('FAIL: ' + msg);
  for (const c of children) if (c.exitCode === null) c.kill('SIGKILL');
  process.exit(1);
}

const watchdog = setTimeout(() => fail(`overall timeout ${OVERALL_TIMEOUT_MS} ms`), OVERALL_TIMEOUT_MS);

function assert(cond, msg) {
  if (!cond) throw new Error('assertion failed: ' + msg);
  log('ok - ' + msg);
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

// ----------------------------------------------------------------------------------
// A JSON-lines child process (server.js or client.js)
// ----------------------------------------------------------------------------------

function startPeer(tag, script, args) {
  const child = spawn(process.execPath, [path.join(__dirname, script), ...args],
    { stdio: ['pipe', 'pipe', 'inherit'] });
  children.push(child);
  child.on('error', (e) => fail(`${tag}: spawn: ${e.message}`));
  const lines = [];
  const waiters = [];
  readline.createInterface({ input: child.stdout }).on('line', (line) => {
    let msg;
    try {
      msg = JSON.parse(line);
    } catch (e) {
      fail(`${tag} wrote a non-JSON line to stdout: ${line}`);
      return;
    }
    log(`   ${tag} << ${line}`);
    const w = waiters.find((x) => x.pred(msg));
    if (w) {
      waiters.splice(waiters.indexOf(w), 1);
      clearTimeout(w.timer);
      w.resolve(msg);
    } else {
      lines.push(msg);
    }
  });
  let nextId = 1;
  const peer = {
    child,
    waitFor(pred, what, ms = 5000) {
      const i = lines.findIndex(pred);
      if (i >= 0) return Promise.resolve(lines.splice(i, 1)[0]);
      return new Promise((resolve, reject) => {
        const w = { pred, resolve };
        w.timer = setTimeout(() => {
          waiters.splice(waiters.indexOf(w), 1);
          reject(new Error(`${tag}: timed out waiting for ${what}`));
        }, ms);
        waiters.push(w);
      });
    },
    command(cmd, ms = 5000) {
      const id = nextId++;
      const line = JSON.stringify(Object.assign({ id }, cmd));
      log(`   ${tag} >> ${line}`);
      child.stdin.write(line + '\n');
      return peer.waitFor((m) => m.id === id, 'reply to ' + line, ms);
    },
    async close() {
      const exited = new Promise((resolve) => {
        if (child.exitCode !== null) resolve({ code: child.exitCode });
        else child.on('exit', (code, sig) => resolve({ code, sig }));
      });
      child.stdin.end();
      return Promise.race([exited, sleep(3000).then(() => null)]);
    },
  };
  return peer;
}

// ----------------------------------------------------------------------------------
// Sockets of a process (Linux /proc)
// ----------------------------------------------------------------------------------

function hexToAddr(hex) {
  if (hex.length === 8) return [3, 2, 1, 0].map((i) => parseInt(hex.substr(i * 2, 2), 16)).join('.');
  return 'ipv6:' + hex;
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

function assertLoopbackOnly(pid, when) {
  const socks = inetSocketsOf(pid);
  if (socks === null) {
    log('skip - /proc not available, cannot list sockets ' + when);
    return [];
  }
  const desc = socks.map((s) => `${s.proto} ${s.address}:${s.port}`).join(', ');
  assert(socks.length > 0 && socks.every((s) => s.address === HOST),
    `every socket of client.js is bound to ${HOST} ${when} [${desc}]`);
  return socks;
}

// ----------------------------------------------------------------------------------
// A raw UDP "LwM2M server"
// ----------------------------------------------------------------------------------

function rawServer() {
  const sock = dgram.createSocket('udp4');
  const inbox = [];
  const all = [];
  const rwaiters = [];
  sock.on('message', (msg, rinfo) => {
    let p;
    try {
      p = pkt.parse(msg);
    } catch (e) {
      return;
    }
    p.rinfo = rinfo;
    all.push(p);
    const w = rwaiters.find((x) => x.pred(p));
    if (w) {
      rwaiters.splice(rwaiters.indexOf(w), 1);
      clearTimeout(w.timer);
      w.resolve(p);
    } else {
      inbox.push(p);
    }
  });
  let mid = 1 + Math.floor(Math.random() * 60000);
  return {
    all,
    bind: () => new Promise((r) => sock.bind(0, HOST, r)),
    port: () => sock.address().port,
    send: (packet, port) => sock.send(pkt.generate(packet), port, HOST),
    nextMid: () => (mid = (mid % 65535) + 1),
    next(pred, what, ms = 5000) {
      const i = inbox.findIndex(pred);
      if (i >= 0) return Promise.resolve(inbox.splice(i, 1)[0]);
      return new Promise((resolve, reject) => {
        const w = { pred, resolve };
        w.timer = setTimeout(() => {
          rwaiters.splice(rwaiters.indexOf(w), 1);
          reject(new Error('raw server: timed out waiting for ' + what));
        }, ms);
        rwaiters.push(w);
      });
    },
    close: () => sock.close(),
  };
}

const optValues = (p, name) => p.options.filter((o) => o.name === name).map((o) => o.value.toString());
const uriPath = (p) => '/' + optValues(p, 'Uri-Path').join('/');
const isReq = (code, p2) => (p) => p.code === code && (!p2 || uriPath(p) === p2);

// ----------------------------------------------------------------------------------
// A. client.js <-> server.js
// ----------------------------------------------------------------------------------

async function partA() {
  log('# A: client.js registers at server.js (lwm2m-node-lib server), no bridge');
  const EP = 'urn:nai:client-smoke@nidd.test';
  const server = startPeer('srv', 'server.js', ['--host', HOST, '--port', '0', '--request-timeout-ms', '5000']);
  const listening = await server.waitFor((m) => m.event === 'listening', 'listening event');
  const client = startPeer('cli', 'client.js',
    ['--server-host', HOST, '--server-port', String(listening.port), '--endpoint', EP, '--lifetime', '300', '--bind-host', HOST]);
  const ready = await client.waitFor((m) => m.event === 'ready', 'ready event');
  assert(ready.endpoint === EP, 'client ready');

  let r = await client.command({ op: 'register' }, 15000);
  assert(r.ok === true && /^rd\/\d+$/.test(r.result.location) && r.result.code === '2.01', `register -> ok, location ${r.result && r.result.location}`);
  const regEv = await client.waitFor((m) => m.event === 'registered', 'registered event');
  assert(regEv.location === r.result.location, 'registered event carries the location');
  const reg = await server.waitFor((m) => m.event === 'registration' && m.endpoint === EP, 'server registration event');
  assert(reg.query === `ep=${EP}&lt=300&lwm2m=1.0&b=U` && reg.lwm2m === '1.0' && reg.binding === 'U' && reg.lifetime === 300,
    `Register query as the server saw it: ${reg.query}`);
  assert(reg.objects === '</3/0>', 'Register payload </3/0>');
  assert(reg.address === HOST && reg.port === r.result.localPort, `Register came from ${HOST}:${reg.port} = the client's listening port`);

  r = await server.command({ op: 'read', endpoint: EP, path: '/3/0/0' });
  assert(r.ok === true && r.result === 'npm lwm2m-node-lib client', 'server reads /3/0/0 -> "npm lwm2m-node-lib client"');
  const rd = await client.waitFor((m) => m.event === 'read' && m.path === '/3/0/0', 'client read event');
  assert(rd.code === '2.05' && rd.value === 'npm lwm2m-node-lib client', 'client reports the read');
  r = await server.command({ op: 'read', endpoint: EP, path: '/3/0/1' });
  assert(r.ok === true && r.result === 'real-device-mode', '/3/0/1 -> "real-device-mode"');
  r = await server.command({ op: 'read', endpoint: EP, path: '/3/0/2' });
  assert(r.ok === true && r.result === 'client-smoke@nidd.test', '/3/0/2 -> serial = endpoint without urn:nai:');
  r = await server.command({ op: 'read', endpoint: EP, path: '/3/0/9' });
  assert(r.ok === true && r.result === '55', '/3/0/9 -> "55"');

  r = await client.command({ op: 'set', path: '/3/0/9', value: '40' });
  assert(r.ok === true, 'client set /3/0/9 = "40"');
  r = await client.command({ op: 'get', path: '/3/0/9' });
  assert(r.ok === true && r.result === '40', 'client get /3/0/9 -> "40"');
  r = await server.command({ op: 'read', endpoint: EP, path: '/3/0/9' });
  assert(r.ok === true && r.result === '40', 'server reads the new battery level "40"');
  r = await client.command({ op: 'set', path: '/5/0/1', value: 'x' });
  assert(r.ok === false && r.kind === 'bad_request', 'set on a missing object -> bad_request');

  r = await server.command({ op: 'observe', endpoint: EP, path: '/3/0/9' });
  assert(r.ok === true && r.result === '40', 'server observes /3/0/9 -> first value "40"');
  r = await client.command({ op: 'set', path: '/3/0/9', value: '35' });
  const note = await server.waitFor((m) => m.event === 'notification' && m.endpoint === EP, 'notification');
  assert(r.ok === true && note.path === '/3/0/9' && note.value === '35', 'client set /3/0/9 = "35" -> server notification "35"');
  const nev = await client.waitFor((m) => m.event === 'notify', 'client notify event');
  assert(nev.path === '/3/0/9' && nev.value === '35', 'client reports the notification');
  r = await server.command({ op: 'cancel', endpoint: EP, path: '/3/0/9' });
  assert(r.ok === true, 'server cancels the observation (locally)');

  r = await server.command({ op: 'write', endpoint: EP, path: '/3/0/14', value: '+02' });
  assert(r.ok === true, 'server writes /3/0/14');
  const wr = await client.waitFor((m) => m.event === 'write', 'client write event');
  assert(wr.path === '/3/0/14' && wr.value === '+02' && wr.code === '2.04', 'client reports the write');
  r = await server.command({ op: 'execute', endpoint: EP, path: '/3/0/4' });
  assert(r.ok === true, 'server executes /3/0/4');
  const ex = await client.waitFor((m) => m.event === 'execute', 'client execute event');
  assert(ex.path === '/3/0/4' && ex.code === '2.04', 'client reports the execute');
  r = await server.command({ op: 'read', endpoint: EP, path: '/3/0/7' });
  assert(r.ok === false && r.code === '4.04', 'read of a missing resource -> 4.04');

  r = await client.command({ op: 'update' }, 15000);
  assert(r.ok === true && r.result.code === '2.04', 'update -> ok (2.04)');
  const upd = await server.waitFor((m) => m.event === 'update' && m.endpoint === EP, 'server update event');
  assert(upd.query === 'lt=300&lwm2m=1.0&b=U' && upd.objects === '</3/0>', `Update query ${upd.query}, payload ${upd.objects}`);
  assert(upd.port === r.result.localPort && upd.port !== reg.port, `Update came from a new source port ${upd.port} (Register: ${reg.port})`);
  r = await server.command({ op: 'read', endpoint: EP, path: '/3/0/0' });
  assert(r.ok === true && r.result === 'npm lwm2m-node-lib client', 'read after Update (to the new port) works');

  const st = await client.command({ op: 'state' });
  assert(st.ok && st.result.registered && st.result.listeningPorts.includes(reg.port) && st.result.listeningPorts.includes(upd.port),
    `client listens on the Register and Update ports ${st.result.listeningPorts.join(', ')}`);
  assertLoopbackOnly(client.child.pid, 'while registered');

  r = await client.command({ op: 'deregister' }, 15000);
  assert(r.ok === true && r.result.code === '2.02', 'deregister -> ok (2.02)');
  await client.waitFor((m) => m.event === 'deregistered', 'deregistered event');
  const un = await server.waitFor((m) => m.event === 'unregistration' && m.endpoint === EP, 'server unregistration event');
  assert(un.reason === 'deregister', `server saw the De-register (from port ${un.port})`);
  r = await client.command({ op: 'update' });
  assert(r.ok === false && r.kind === 'not_registered', 'update after deregister -> not_registered');
  const st2 = await client.command({ op: 'state' });
  assert(st2.ok && st2.result.listeningPorts.length === 0, 'all listeners stopped after deregister');

  const ce = await client.close();
  assert(ce && ce.code === 0, 'client.js exits with 0 on stdin EOF');
  const se = await server.close();
  assert(se && se.code === 0, 'server.js exits with 0 on stdin EOF');
}

// ----------------------------------------------------------------------------------
// B. client.js <-> raw UDP server: what goes over the wire
// ----------------------------------------------------------------------------------

async function partB() {
  log('# B: client.js against a raw UDP server (wire format)');
  const EP = 'urn:nai:client-wire@nidd.test';
  const srv = rawServer();
  await srv.bind();
  const client = startPeer('cli', 'client.js',
    ['--server-port', String(srv.port()), '--endpoint', EP, '--lifetime', '120']);
  await client.waitFor((m) => m.event === 'ready', 'ready event');

  // Register: answered piggybacked, with two Location-Path options
  const regP = client.command({ op: 'register' }, 10000);
  const reg = await srv.next(isReq('0.02', '/rd'), 'Register');
  const cf = optValues(reg, 'Content-Format');
  log(`info - Register: ${reg.confirmable ? 'CON' : 'NON'} from port ${reg.rinfo.port}, token ${reg.token.length} bytes, ` +
    `Uri-Query ${JSON.stringify(optValues(reg, 'Uri-Query'))}, Content-Format ${cf.length ? reg.options.find((o) => o.name === 'Content-Format').value.toString('hex') : 'absent'}, ` +
    `payload ${JSON.stringify(reg.payload.toString())}`);
  assert(reg.confirmable && reg.rinfo.address === HOST, 'Register is CON from 127.0.0.1');
  assert(JSON.stringify(optValues(reg, 'Uri-Query')) === JSON.stringify([`ep=${EP}`, 'lt=120', 'lwm2m=1.0', 'b=U']),
    'Register Uri-Query options: ep, lt, lwm2m=1.0, b=U');
  assert(cf.length === 0 && reg.payload.toString() === '</3/0>', 'Register payload </3/0> without Content-Format');
  srv.send({ ack: true, code: '2.01', messageId: reg.messageId, token: reg.token,
    options: [{ name: 'Location-Path', value: Buffer.from('rd') }, { name: 'Location-Path', value: Buffer.from('x7') }] }, reg.rinfo.port);
  let r = await regP;
  assert(r.ok === true && r.result.location === 'rd/x7' && r.result.localPort === reg.rinfo.port,
    'two Location-Path options -> location "rd/x7"; client listens on the Register source port');

  // a request to the client from the server socket (what the bridge/mock SCEF will do)
  await sleep(100); // the lib starts its listener on that port after a tick
  const gm = srv.nextMid();
  srv.send({ confirmable: true, code: '0.01', messageId: gm, token: Buffer.from('a1b2c3d4', 'hex'),
    options: ['3', '0', '0'].map((s) => ({ name: 'Uri-Path', value: Buffer.from(s) })) }, reg.rinfo.port);
  const gr = await srv.next((p) => p.messageId === gm && p.ack, 'response to GET /3/0/0');
  assert(gr.code === '2.05' && gr.payload.toString() === 'npm lwm2m-node-lib client' &&
    gr.token.toString('hex') === 'a1b2c3d4', 'GET /3/0/0 -> piggybacked 2.05 "npm lwm2m-node-lib client"');
  log(`info - read response Content-Format: ${optValues(gr, 'Content-Format').length ? gr.options.find((o) => o.name === 'Content-Format').value.toString('hex') : 'absent'}`);

  // a request the lib has no route for gets no answer but an empty ACK
  const dm = srv.nextMid();
  srv.send({ confirmable: true, code: '0.04', messageId: dm, token: Buffer.from('00000001', 'hex'),
    options: ['3', '0'].map((s) => ({ name: 'Uri-Path', value: Buffer.from(s) })) }, reg.rinfo.port);
  const un = await client.waitFor((m) => m.event === 'unhandled', 'unhandled event');
  assert(un.method === 'DELETE' && un.url === '/3/0', 'DELETE /3/0 -> "unhandled" event');
  const dack = await srv.next((p) => p.messageId === dm, 'ACK to DELETE', 3000);
  assert(dack.ack && dack.code === '0.00', 'DELETE gets only an empty ACK (node-coap, after ~500 ms)');

  // Update: new source port; answered with an empty ACK and a separate CON response
  const updP = client.command({ op: 'update' }, 10000);
  const upd = await srv.next(isReq('0.02', '/rd/x7'), 'Update');
  assert(upd.rinfo.port !== reg.rinfo.port && JSON.stringify(optValues(upd, 'Uri-Query')) === JSON.stringify(['lt=120', 'lwm2m=1.0', 'b=U']) &&
    upd.payload.toString() === '</3/0>', `Update: POST /rd/x7 from a new port ${upd.rinfo.port}, Uri-Query lt,lwm2m,b, payload </3/0>`);
  srv.send({ ack: true, code: '0.00', messageId: upd.messageId, token: Buffer.alloc(0), options: [] }, upd.rinfo.port);
  await sleep(300);
  const sm = srv.nextMid();
  srv.send({ confirmable: true, code: '2.04', messageId: sm, token: upd.token, options: [] }, upd.rinfo.port);
  const sack = await srv.next((p) => p.messageId === sm && p.ack, 'ACK of the separate response');
  r = await updP;
  assert(sack.code === '0.00' && r.ok === true && r.result.localPort === upd.rinfo.port,
    'separate (empty ACK + CON 2.04) Update response is ACKed and accepted');

  // De-register answered with 4.04 -> error reply (the lib itself would call it success)
  const delP = client.command({ op: 'deregister' }, 10000);
  const del = await srv.next(isReq('0.04', '/rd/x7'), 'De-register');
  assert(del.rinfo.port !== reg.rinfo.port && del.rinfo.port !== upd.rinfo.port, `De-register from yet another port ${del.rinfo.port}`);
  srv.send({ ack: true, code: '4.04', messageId: del.messageId, token: del.token, options: [] }, del.rinfo.port);
  r = await delP;
  assert(r.ok === false && r.kind === 'coap_error' && r.code === '4.04', 'De-register answered 4.04 -> coap_error reply');
  const ce = await client.close();
  assert(ce && ce.code === 0, 'client.js exits with 0 on stdin EOF');
  srv.close();

  // Unanswered Register: bounded, retransmissions stop
  log('# B2: unanswered Register');
  const mute = rawServer();
  await mute.bind();
  const c2 = startPeer('cli2', 'client.js',
    ['--server-port', String(mute.port()), '--endpoint', 'urn:nai:mute@nidd.test', '--ack-timeout-ms', '400', '--request-timeout-ms', '2000']);
  await c2.waitFor((m) => m.event === 'ready', 'ready event');
  const t0 = Date.now();
  r = await c2.command({ op: 'register' }, 6000);
  const took = Date.now() - t0;
  assert(r.ok === false && r.kind === 'timeout' && took < 3000, `unanswered Register -> timeout reply after ${took} ms`);
  const n = mute.all.length;
  const mids = new Set(mute.all.map((p) => p.messageId));
  await sleep(1500);
  assert(n >= 2 && mids.size === 1 && mute.all.length === n,
    `${n} transmissions of the same Register (same MID), none after the timeout`);
  r = await c2.command({ op: 'ping' });
  assert(r.ok === true && r.result === 'pong', 'client still alive');
  // SIGTERM -> exit 0
  const exited = new Promise((resolve) => c2.child.on('exit', (code) => resolve(code)));
  c2.child.kill('SIGTERM');
  const code = await Promise.race([exited, sleep(3000).then(() => null)]);
  assert(code === 0, 'client.js exits with 0 on SIGTERM');
  mute.close();
}

async function main() {
  await partA();
  await partB();
  clearTimeout(watchdog);
  log('PASS');
  process.exit(0);
}

main().catch((e) => fail(e && e.stack ? e.stack : String(e)));

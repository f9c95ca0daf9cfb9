#!/usr/bin/env node
'use strict';

// JSON-lines driver around the third-party LwM2M *client* of npm `lwm2m-node-lib` 1.4.0
// (lib/lwm2m-client.js): a real UDP LwM2M 1.0 device with object /3/0.
// Protocol: see README.md ("client.js"). stdout carries only protocol lines; diagnostics
// go to stderr.

const { AsyncLocalStorage } = require('async_hooks');
const net = require('net');
const readline = require('readline');

const USAGE = `usage: node client.js --server-port N --endpoint EP [--server-host 127.0.0.1]
                      [--lifetime 300] [--bind-host 127.0.0.1] [--lwm2m-version 1.0]
                      [--request-timeout-ms 60000] [--ack-timeout-ms 4000] [--verbose]`;

// ---------------------------------------------------------------------------------------
// Arguments
// ---------------------------------------------------------------------------------------

function isLoopback(host) {
  return (net.isIPv4(host) && host.startsWith('127.')) || host === '::1';
}

function parseArgs(argv) {
  const opts = {
    serverHost: '127.0.0.1',
    serverPort: null,
    endpoint: null,
    lifetime: 300,
    bindHost: '127.0.0.1',
    version: '1.0',
    requestTimeoutMs: 60000,
    ackTimeoutMs: 4000,
    verbose: false,
  };
  const intArg = (name, v, min, max) => {
    if (v === undefined || !/^\d+$/.test(v)) throw new Error(`${name} needs an integer`);
    const n = Number(v);
    if (n < min || n > max) throw new Error(`${name} must be in ${min}..${max}`);
    return n;
  };
  for (let i = 0; i < argv.length; i++) {
    let a = argv[i];
    let v;
    const eq = a.indexOf('=');
    if (a.startsWith('--') && eq > 0) {
      v = a.slice(eq + 1);
      a = a.slice(0, eq);
    }
    const next = () => (v !== undefined ? v : argv[++i]);
    switch (a) {
      case '--server-host': opts.serverHost = next(); break;
      case '--server-port': opts.serverPort = intArg(a, next(), 1, 65535); break;
      case '--endpoint': opts.endpoint = next(); break;
      case '--lifetime': opts.lifetime = intArg(a, next(), 1, 0xffffffff); break;
      case '--bind-host': opts.bindHost = next(); break;
      case '--lwm2m-version': opts.version = next(); break;
      case '--request-timeout-ms': opts.requestTimeoutMs = intArg(a, next(), 1, 3600000); break;
      case '--ack-timeout-ms': opts.ackTimeoutMs = intArg(a, next(), 100, 60000); break;
      case '--verbose': case '-v': opts.verbose = true; break;
      case '--help': case '-h': process.stdout.write(USAGE + '\n'); process.exit(0); break;
      default: throw new Error('unknown argument: ' + argv[i]);
    }
  }
  if (opts.serverPort === null) throw new Error('--server-port is required');
  if (typeof opts.endpoint !== 'string' || opts.endpoint === '') throw new Error('--endpoint is required');
  // The lib puts the endpoint unencoded into the Uri-Query "ep=..." and splits the query
  // string on '&' (coap/lib/agent.js urlPropertyToPacketOption).
  if (opts.endpoint.includes('&')) throw new Error('--endpoint must not contain "&"');
  if (typeof opts.version !== 'string' || !/^[0-9.]+$/.test(opts.version)) throw new Error('--lwm2m-version must look like 1.0');
  for (const k of ['serverHost', 'bindHost']) {
    if (opts[k] === 'localhost') opts[k] = '127.0.0.1';
  }
  if (!isLoopback(opts.bindHost)) throw new Error('--bind-host must be a loopback address (127.x.x.x or ::1)');
  if (!net.isIP(opts.serverHost)) throw new Error('--server-host must be an IP address');
  if (net.isIPv6(opts.serverHost) !== net.isIPv6(opts.bindHost)) {
    throw new Error('--server-host and --bind-host must be of the same IP family');
  }
  return opts;
}

let opts;
try {
  opts = parseArgs(process.argv.slice(2));
} catch (e) {
  process.stderr.write(`client.js: ${e.message}\n${USAGE}\n`);
  process.exit(2);
}

// Warnings, LWM2M_* variables and stdout handling: see peer-process.js.
const { emit, diag } = require('./peer-process').setupProcess({
  tag: 'lwm2m-client',
  verbose: opts.verbose,
  onStdoutBroken: () => shutdown(0),
});

// ---------------------------------------------------------------------------------------
// Library set-up (patch coap before lwm2m-node-lib loads it)
// ---------------------------------------------------------------------------------------

const patches = require('./coap-patches');
patches.registerAllFormats();
// Every socket of this process on --bind-host: the per-request Agent sockets (Register,
// Update, De-register each use a fresh Agent, hence a fresh ephemeral source port) and the
// coap servers the lib starts on those ports to receive the server's requests.
patches.bindAllSocketsTo(opts.bindHost);

const coap = patches.coap;
// CoAP retransmission timing (process-wide in node-coap). ACK_TIMEOUT is raised from 2 s
// to --ack-timeout-ms (default 4 s) because the path to the server may go through NIDD;
// MAX_RETRANSMIT stays 4. The driver itself bounds every registration-interface command
// with --request-timeout-ms and aborts the lib's request when it expires.
coap.updateTiming({ ackTimeout: opts.ackTimeoutMs / 1000, ackRandomFactor: 1.5, maxRetransmit: 4 });

const logger = patches.requireFromLib('logops');
logger.setStream(process.stderr);
logger.setLevel(opts.verbose ? 'DEBUG' : 'FATAL');

const lwm2m = require('lwm2m-node-lib');
const client = lwm2m.client;
// Internal modules of the lib, the very instances lib/lwm2m-client.js uses (it looks up
// `readService.handle`, `require('./services/client/write').handle`, ... and
// `coapRouter.start` at call time, so replacing the exports below takes effect).
const LIB = 'lwm2m-node-lib/lib/services/';
const coapRouter = require(LIB + 'coapRouter');
const readService = require(LIB + 'client/read');
const writeService = require(LIB + 'client/write');
const executeService = require(LIB + 'client/execute');

const ipFamily = net.isIPv6(opts.bindHost) ? 'udp6' : 'udp4';
const clientConfig = {
  client: {
    lifetime: String(opts.lifetime),
    version: opts.version,
    logLevel: opts.verbose ? 'DEBUG' : 'FATAL',
    observe: { period: 3000 },
    ipProtocol: ipFamily, // Agent sockets (Register/Update/De-register)
    serverProtocol: ipFamily, // the coap server that receives the LwM2M server's requests
    udpWindow: 100,
    formats: patches.KNOWN_FORMATS.map(([name, value]) => ({ name, value })),
    writeFormat: 'lightweightm2m/text',
    // `port` is set by the lib itself to the Register/Update source port (startListener)
  },
  // no top-level logLevel: register() would otherwise reset the logops level
};
client.init(clientConfig);

// ---------------------------------------------------------------------------------------
// Capture of the registration-interface exchanges (Register / Update / De-register)
// ---------------------------------------------------------------------------------------

// Each of client.register/update/unregister sends exactly one request through
// `new coap.Agent().request()`. The command it belongs to comes from AsyncLocalStorage;
// we keep the agent and request (to abort them on timeout) and the raw response code
// (the lib hides it for De-register, and for Register/Update only passes it on failure).
const als = new AsyncLocalStorage();
const origAgentRequest = coap.Agent.prototype.request;
coap.Agent.prototype.request = function requestWithCapture(url) {
  const req = origAgentRequest.call(this, url);
  const ctx = als.getStore();
  if (ctx && !ctx.req) {
    ctx.agent = this;
    ctx.req = req;
    req.once('response', (res) => {
      ctx.coap = {
        code: res.code,
        localPort: res.outSocket ? res.outSocket.port : null,
        locationPath: (res.options || []).filter((o) => o.name === 'Location-Path').map((o) => String(o.value)),
      };
    });
  }
  return req;
};

// ---------------------------------------------------------------------------------------
// Listeners: the lib starts a coap server on the source port of each successful Register
// and Update (lib/lwm2m-client.js startListener) and only stops the latest one on
// De-register. We keep track of all of them.
// ---------------------------------------------------------------------------------------

const listeners = []; // serverInfo objects of running lib listeners

const origRouterStart = coapRouter.start;
coapRouter.start = function startWithTracking(config, callback) {
  let reported = false;
  return origRouterStart.call(this, config, (error, serverInfo) => {
    if (reported) return; // node-coap may report a bind error twice
    reported = true;
    if (!error && serverInfo && serverInfo.server) {
      const srv = serverInfo.server;
      let port = null;
      try {
        port = srv._sock.address().port;
      } catch (e) { /* not bound */ }
      serverInfo.niddPort = port;
      listeners.push(serverInfo);
      diag(`lib listener started on ${opts.bindHost}:${port}`);
      // Before the lib's dataHandler: was this Message ID the one the lib saw last?
      srv.prependListener('request', (req) => {
        req._niddDuplicate = !!(serverInfo.window && serverInfo.window.contains(req._packet.messageId));
      });
      // After it: the lib answers only requests that match one of its routes
      // (POST /O/I/R, PUT /O..., GET /O...); everything else gets no response at all.
      srv.on('request', (req) => {
        if (req._niddHandled || req.code === '0.00') return;
        emit({
          event: 'unhandled',
          method: req.method,
          url: req.url,
          messageId: req._packet.messageId,
          reason: req._niddDuplicate ? 'duplicate message id (dropped by the lib)' : 'no route in the lib (no response is sent)',
          address: req.rsinfo.address,
          port: req.rsinfo.port,
        });
      });
    } else if (error) {
      diag('lib listener failed to start: ' + (error.message || error.code || error));
    }
    callback(error, serverInfo);
  });
};

function stopListener(serverInfo) {
  const i = listeners.indexOf(serverInfo);
  if (i >= 0) listeners.splice(i, 1);
  try {
    if (serverInfo.server && serverInfo.server._sock) serverInfo.server.close();
  } catch (e) { /* already closed */ }
}

function stopAllListeners() {
  for (const s of [...listeners]) stopListener(s);
}

// ---------------------------------------------------------------------------------------
// Device-management events (server -> client): wrap the lib's operation handlers
// ---------------------------------------------------------------------------------------

function hasOption(req, name) {
  return (req.options || []).some((o) => o.name === name);
}

function requestInfo(req) {
  const url = require('url').parse(req.url);
  return {
    path: url.pathname,
    query: url.query || null,
    payload: Buffer.isBuffer(req.payload) ? req.payload.toString('utf8') : '',
    address: req.rsinfo ? req.rsinfo.address : null,
    port: req.rsinfo ? req.rsinfo.port : null,
  };
}

// Calls `report(code, body)` once, when the lib answers (res.end, or the first res.write
// of an Observe stream); later res.write calls (notifications) go to `notify(body)`.
function hookResponse(res, report, notify) {
  let answered = false;
  const origEnd = res.end;
  const origWrite = res.write;
  res.end = function (...args) {
    if (!answered) {
      answered = true;
      report(res.code, args[0]);
    }
    return origEnd.apply(this, args);
  };
  res.write = function (...args) {
    if (!answered) {
      answered = true;
      report(res.code, args[0]);
    } else if (notify) {
      notify(args[0]);
    }
    return origWrite.apply(this, args);
  };
}

const bodyText = (b) => (b === undefined || b === null ? '' : Buffer.isBuffer(b) ? b.toString('utf8') : String(b));

const origRead = readService.handle;
readService.handle = function readWithEvents(req, res, userHandler) {
  req._niddHandled = true;
  const info = requestInfo(req);
  const discover = (req.options || []).some((o) => o.name === 'Accept' && o.value === 'application/link-format');
  const hasObserve = !discover && hasOption(req, 'Observe');
  // node-coap only makes an Observe stream for Observe: 0 (coap/lib/server.js); for any
  // other value (e.g. 1 = cancel) the lib still writes without ending the response, so
  // nothing but node-coap's empty ACK goes out.
  const observe = hasObserve && req.headers && req.headers.Observe === 0;
  let seq = 0;
  hookResponse(res, (code, body) => {
    const ev = { event: discover ? 'discover' : 'read', path: info.path, code, value: bodyText(body) };
    if (observe) ev.observe = true;
    if (hasObserve && !observe) {
      ev.observe = false;
      ev.observeOption = req.headers ? req.headers.Observe : null;
      ev.code = null; // never sent
      ev.answered = false;
    }
    ev.address = info.address;
    ev.port = info.port;
    emit(ev);
  }, observe ? (body) => {
    seq++;
    emit({ event: 'notify', path: info.path, value: bodyText(body), seq });
  } : null);
  return origRead.call(this, req, res, userHandler);
};

const origWrite = writeService.handle;
writeService.handle = function writeWithEvents(req, res, userHandler) {
  req._niddHandled = true;
  const info = requestInfo(req);
  // write.js: a PUT whose URL contains '?' is Write-Attributes (stored, not written)
  const attrs = req.url.indexOf('?') > 0;
  hookResponse(res, (code) => {
    const ev = attrs
      ? { event: 'write-attributes', path: info.path, query: info.query, code }
      : { event: 'write', path: info.path, value: info.payload, code };
    ev.address = info.address;
    ev.port = info.port;
    emit(ev);
  });
  return origWrite.call(this, req, res, userHandler);
};

const origExecute = executeService.handle;
executeService.handle = function executeWithEvents(req, res, userHandler) {
  req._niddHandled = true;
  const info = requestInfo(req);
  hookResponse(res, (code) => {
    emit({ event: 'execute', path: info.path, args: info.payload, code, address: info.address, port: info.port });
  });
  return origExecute.call(this, req, res, userHandler);
};

// ---------------------------------------------------------------------------------------
// Objects
// ---------------------------------------------------------------------------------------

function promisify(fn, ...args) {
  return new Promise((resolve, reject) => fn(...args, (e, r) => (e ? reject(e) : resolve(r))));
}

async function createObjects() {
  const serial = opts.endpoint.replace(/^urn:nai:/, '');
  await promisify(client.registry.create, '/3/0');
  await promisify(client.registry.setResource, '/3/0', '0', 'npm lwm2m-node-lib client');
  await promisify(client.registry.setResource, '/3/0', '1', 'real-device-mode');
  await promisify(client.registry.setResource, '/3/0', '2', serial);
  await promisify(client.registry.setResource, '/3/0', '9', '55');
}

// ---------------------------------------------------------------------------------------
// Commands
// ---------------------------------------------------------------------------------------

class CmdError extends Error {
  constructor(kind, message, code) {
    super(message);
    this.kind = kind;
    if (code) this.code = code;
  }
}

let device = null; // deviceInformation of the lib after a successful Register
let shuttingDown = false;
let chain = Promise.resolve(); // registration-interface commands run one at a time
const pendingIds = new Set(); // wrappers of commands not yet answered

function describe(dev) {
  return {
    location: dev.location,
    localPort: dev.localPort,
    server: { host: dev.currentHost, port: dev.currentPort },
    lifetime: opts.lifetime,
  };
}

// Runs one lib registration-interface call `start(cb)` under a capture context, bounded
// by timeoutMs. On timeout the lib's CoAP request is aborted (no more retransmissions,
// its socket is closed) and the lib's callback will never come.
function runLibExchange(what, timeoutMs, start) {
  return new Promise((resolve, reject) => {
    const ctx = { req: null, agent: null, coap: null, finished: false };
    const finish = (err, result) => {
      if (ctx.finished) return;
      ctx.finished = true;
      clearTimeout(timer);
      if (err) {
        err.coap = ctx.coap;
        reject(err);
      } else {
        resolve({ result, coap: ctx.coap });
      }
    };
    const timer = setTimeout(() => {
      if (ctx.agent && ctx.req) {
        try {
          ctx.agent.abort(ctx.req);
        } catch (e) { /* already finished */ }
      }
      const msg = ctx.coap
        ? `${what}: the server answered ${ctx.coap.code} but lwm2m-node-lib did not finish within ${timeoutMs} ms`
        : `${what}: no answer from the server within ${timeoutMs} ms`;
      finish(new CmdError('timeout', msg));
    }, timeoutMs);
    als.run(ctx, () => {
      try {
        start((err, result) => finish(err, result));
      } catch (e) {
        finish(e);
      }
    });
  });
}

function libErr(err, what) {
  if (err instanceof CmdError) return err;
  const code = err && typeof err.code === 'string' && /^\d\.\d\d$/.test(err.code) ? err.code : null;
  const got = err && err.coap && err.coap.code;
  if (got && !got.startsWith('2.')) return new CmdError('coap_error', `${what}: server answered ${got}`, got);
  const msg = (err && (err.message || err.name)) || String(err);
  return new CmdError('lib_error', `${what}: ${msg}`, code);
}

function commandTimeout(cmd) {
  if (cmd.timeoutMs === undefined) return opts.requestTimeoutMs;
  if (!Number.isInteger(cmd.timeoutMs) || cmd.timeoutMs < 1 || cmd.timeoutMs > 3600000) {
    throw new CmdError('bad_request', '"timeoutMs" must be an integer in 1..3600000');
  }
  return cmd.timeoutMs;
}

function parseResourcePath(path) {
  const m = typeof path === 'string' ? /^\/?(\d{1,5})\/(\d{1,5})\/(\d{1,5})$/.exec(path) : null;
  if (!m) throw new CmdError('bad_request', `bad path ${JSON.stringify(path)}: expected /O/I/R`);
  return { objectUri: `/${Number(m[1])}/${Number(m[2])}`, resourceId: String(Number(m[3])) };
}

const regOps = {
  async register(cmd) {
    const timeoutMs = commandTimeout(cmd);
    const { result: dev, coap: c } = await runLibExchange('Register', timeoutMs, (cb) =>
      client.register(opts.serverHost, opts.serverPort, null, opts.endpoint, cb))
      .catch((e) => { throw libErr(e, 'Register'); });
    device = dev;
    const d = describe(dev);
    emit({ event: 'registered', location: d.location, localPort: d.localPort, lifetime: opts.lifetime, code: c && c.code });
    return Object.assign(d, { code: c && c.code });
  },

  async update(cmd) {
    if (!device) throw new CmdError('not_registered', 'not registered');
    const timeoutMs = commandTimeout(cmd);
    const { coap: c } = await runLibExchange('Update', timeoutMs, (cb) => client.update(device, cb))
      .catch((e) => { throw libErr(e, 'Update'); });
    const d = describe(device);
    emit({ event: 'updated', location: d.location, localPort: d.localPort, code: c && c.code });
    return Object.assign(d, { code: c && c.code });
  },

  async deregister(cmd) {
    if (!device) throw new CmdError('not_registered', 'not registered');
    const timeoutMs = commandTimeout(cmd);
    const dev = device;
    let c;
    try {
      ({ coap: c } = await runLibExchange('De-register', timeoutMs, (cb) => client.unregister(dev, cb)));
    } catch (e) {
      throw libErr(e, 'De-register');
    }
    // The lib treats *any* answer as success: it has cancelled its observations and
    // stopped its latest listener. Stop the older ones (from Register / earlier Updates).
    device = null;
    stopAllListeners();
    if (c && c.code && !c.code.startsWith('2.')) {
      emit({ event: 'error', error: `De-register answered ${c.code}; local registration state dropped anyway` });
      throw new CmdError('coap_error', `De-register: server answered ${c.code}`, c.code);
    }
    emit({ event: 'deregistered', location: dev.location, code: c && c.code });
    return { location: dev.location, code: c && c.code };
  },
};

const localOps = {
  ping() {
    return 'pong';
  },

  state() {
    return {
      endpoint: opts.endpoint,
      registered: !!device,
      registration: device ? describe(device) : null,
      listeningPorts: listeners.map((l) => l.niddPort),
    };
  },

  async set(cmd) {
    const { objectUri, resourceId } = parseResourcePath(cmd.path);
    if (cmd.value === undefined || cmd.value === null || typeof cmd.value === 'object') {
      throw new CmdError('bad_request', '"value" must be a string, number or boolean');
    }
    try {
      await promisify(client.registry.setResource, objectUri, resourceId, String(cmd.value));
    } catch (e) {
      throw new CmdError('bad_request', (e && e.message) || String(e));
    }
    return null;
  },

  async get(cmd) {
    const { objectUri, resourceId } = parseResourcePath(cmd.path);
    let obj;
    try {
      obj = await promisify(client.registry.get, objectUri);
    } catch (e) {
      throw new CmdError('bad_request', (e && e.message) || String(e));
    }
    const v = obj.attributes[resourceId];
    return v === undefined ? null : String(v);
  },
};

function reply(id, error, result) {
  if (error) {
    const out = { id, ok: false, error: error.message || String(error), kind: error.kind || 'lib_error' };
    if (error.code) out.code = error.code;
    emit(out);
  } else {
    emit({ id, ok: true, result: result === undefined ? null : result });
  }
}

function handleLine(line) {
  const text = line.trim();
  if (text === '') return;
  let cmd;
  try {
    cmd = JSON.parse(text);
  } catch (e) {
    reply(null, new CmdError('bad_request', 'invalid JSON: ' + e.message));
    return;
  }
  if (!cmd || typeof cmd !== 'object' || Array.isArray(cmd)) {
    reply(null, new CmdError('bad_request', 'command must be a JSON object'));
    return;
  }
  const id = cmd.id === undefined ? null : cmd.id;
  const has = (o) => typeof cmd.op === 'string' && Object.prototype.hasOwnProperty.call(o, cmd.op);
  if (shuttingDown) {
    reply(id, new CmdError('unavailable', 'client shutting down'));
    return;
  }
  if (has(localOps)) {
    Promise.resolve()
      .then(() => localOps[cmd.op](cmd))
      .then((r) => reply(id, null, r), (e) => reply(id, e instanceof CmdError ? e : new CmdError('lib_error', e.message || String(e))));
  } else if (has(regOps)) {
    const p = { id, answered: false };
    pendingIds.add(p);
    const answer = (e, r) => {
      if (p.answered || shuttingDown) return;
      p.answered = true;
      pendingIds.delete(p);
      reply(id, e, r);
    };
    chain = chain.then(() => (shuttingDown ? null : regOps[cmd.op](cmd)))
      .then((r) => answer(null, r), (e) => answer(e instanceof CmdError ? e : new CmdError('lib_error', e.message || String(e))))
      .then(() => {}, () => {});
  } else {
    const known = [...Object.keys(regOps), ...Object.keys(localOps)].join(', ');
    reply(id, new CmdError('bad_request', `unknown op ${JSON.stringify(cmd.op)}; known: ${known}`));
  }
}

// ---------------------------------------------------------------------------------------
// Life cycle
// ---------------------------------------------------------------------------------------

function shutdown(code) {
  if (shuttingDown) return;
  shuttingDown = true;
  for (const p of pendingIds) {
    p.answered = true;
    reply(p.id, new CmdError('unavailable', 'client shutting down'));
  }
  pendingIds.clear();
  const force = setTimeout(() => process.exit(code), 1000);
  force.unref();
  try {
    readService.cancelAll(() => {});
  } catch (e) { /* ignore */ }
  stopAllListeners();
  setImmediate(() => process.exit(code));
}

process.on('SIGTERM', () => shutdown(0));
process.on('SIGINT', () => shutdown(0));

// A test peer should survive odd datagrams and lib bugs: report instead of dying.
process.on('uncaughtException', (e) => {
  process.stderr.write('[lwm2m-client] uncaught exception: ' + (e && e.stack ? e.stack : e) + '\n');
  emit({ event: 'error', error: e && e.message ? e.message : String(e) });
});
process.on('unhandledRejection', (e) => {
  emit({ event: 'error', error: e && e.message ? e.message : String(e) });
});

createObjects().then(() => {
  emit({
    event: 'ready',
    endpoint: opts.endpoint,
    server: { host: opts.serverHost, port: opts.serverPort },
    lwm2m: opts.version,
    lifetime: opts.lifetime,
  });
  const rl = readline.createInterface({ input: process.stdin, crlfDelay: Infinity });
  rl.on('line', (line) => {
    try {
      handleLine(line);
    } catch (e) {
      reply(null, new CmdError('lib_error', e && e.message ? e.message : String(e)));
    }
  });
  rl.on('close', () => shutdown(0));
}, (e) => {
  emit({ event: 'error', error: 'failed to create objects: ' + (e && e.message ? e.message : String(e)) });
  process.exit(1);
});

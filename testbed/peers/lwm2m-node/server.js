#!/usr/bin/env node
'use strict';

// JSON-lines driver around the third-party LwM2M server of npm `lwm2m-node-lib` 1.4.0.
// Protocol: see README.md. stdout carries only protocol lines; diagnostics go to stderr.

const { AsyncLocalStorage } = require('async_hooks');
const readline = require('readline');

const USAGE = `usage: node server.js [--host 127.0.0.1|::1] [--port N] [--request-timeout-ms MS]
                      [--lifetime-check-ms MS] [--write-format NAME|NUMBER]
                      [--accept-format NAME|NUMBER] [--verbose]`;

// ---------------------------------------------------------------------------------------
// Arguments
// ---------------------------------------------------------------------------------------

function parseArgs(argv) {
  const opts = {
    host: '127.0.0.1',
    port: 0,
    requestTimeoutMs: 10000,
    lifetimeCheckMs: 1000,
    writeFormat: undefined, // lib default: 'lightweightm2m/text' (1541)
    acceptFormat: undefined, // lib default: no Accept option on read/observe
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
      case '--host': opts.host = next(); break;
      case '--port': opts.port = intArg(a, next(), 0, 65535); break;
      case '--request-timeout-ms': opts.requestTimeoutMs = intArg(a, next(), 1, 3600000); break;
      case '--lifetime-check-ms': opts.lifetimeCheckMs = intArg(a, next(), 10, 3600000); break;
      case '--write-format': opts.writeFormat = next(); break;
      case '--accept-format': opts.acceptFormat = next(); break;
      case '--verbose': case '-v': opts.verbose = true; break;
      case '--help': case '-h': process.stdout.write(USAGE + '\n'); process.exit(0); break;
      default: throw new Error('unknown argument: ' + argv[i]);
    }
  }
  if (opts.host === 'localhost') opts.host = '127.0.0.1';
  // lwm2m-node-lib sends every device request to its own server socket as a CoAP
  // proxy request addressed to the hard-coded 127.0.0.1 (or ::1 when ipProtocol is
  // udp6), lib/services/server/deviceManagement.js:56. Any other bind address would
  // break reads/writes, so only the two loopback addresses are accepted.
  if (opts.host !== '127.0.0.1' && opts.host !== '::1') {
    throw new Error('--host must be 127.0.0.1 (or localhost) or ::1');
  }
  return opts;
}

let opts;
try {
  opts = parseArgs(process.argv.slice(2));
} catch (e) {
  process.stderr.write(`server.js: ${e.message}\n${USAGE}\n`);
  process.exit(2);
}

// Warnings, LWM2M_* variables and stdout handling: see peer-process.js.
const { emit, diag } = require('./peer-process').setupProcess({
  tag: 'lwm2m-peer',
  verbose: opts.verbose,
  onStdoutBroken: () => shutdown(0),
});

// ---------------------------------------------------------------------------------------
// Library set-up (patch coap before lwm2m-node-lib loads it)
// ---------------------------------------------------------------------------------------

const patches = require('./coap-patches');
patches.registerAllFormats();
patches.bindAllSocketsTo(opts.host);

let writeFormat;
let acceptFormat;
try {
  writeFormat = patches.formatName(opts.writeFormat) || 'lightweightm2m/text';
  acceptFormat = patches.formatName(opts.acceptFormat);
} catch (e) {
  process.stderr.write(`server.js: ${e.message}\n`);
  process.exit(2);
}

// logops writes to process.stdout by default: move it to stderr so stdout stays pure JSON.
const logger = patches.requireFromLib('logops');
logger.setStream(process.stderr);
logger.setLevel(opts.verbose ? 'DEBUG' : 'FATAL');

const lwm2m = require('lwm2m-node-lib');
const lib = lwm2m.server;

// Capture the raw CoAP response (code, Content-Format, payload bytes) of the request the
// lib sends for a command. Every lib request goes through `new coap.Agent().request()`
// (lib/services/server/coapUtils.js:68-69) on the same coap module instance; the command
// it belongs to comes from AsyncLocalStorage. Hooking the agent (rather than the lib's
// callbacks) also sees answers the lib never passes on, e.g. an error answer to Observe.
const als = new AsyncLocalStorage();
const origAgentRequest = patches.coap.Agent.prototype.request;
patches.coap.Agent.prototype.request = function requestWithCapture(url) {
  const req = origAgentRequest.call(this, url);
  const ctx = als.getStore();
  if (ctx) {
    req.once('response', (res) => {
      const cfName = res.headers ? res.headers['Content-Format'] : undefined;
      ctx.coap = {
        code: res.code,
        contentFormat: patches.formatNumber(cfName),
        payloadBase64: Buffer.isBuffer(res.payload) ? res.payload.toString('base64') : null,
      };
      // An error answer to an Observe never reaches the lib's callback (it waits for a
      // first data chunk, informationReporting.js:117-136, or for the end of a stream
      // that never ends): fail the command now.
      if (url.observe && typeof res.code === 'string' && !res.code.startsWith('2.') && ctx.done) {
        ctx.done(new CmdError('coap_error', `device answered ${res.code}`, res.code));
      }
    });
  }
  return req;
};

const libConfig = {
  port: opts.port,
  lifetimeCheckInterval: opts.lifetimeCheckMs,
  udpWindow: 100,
  defaultType: 'Device', // without it every Register fails with 4.04 TYPE_NOT_FOUND
  logLevel: opts.verbose ? 'DEBUG' : 'FATAL',
  ipProtocol: opts.host === '::1' ? 'udp6' : 'udp4',
  serverProtocol: opts.host === '::1' ? 'udp6' : 'udp4',
  formats: patches.KNOWN_FORMATS.map(([name, value]) => ({ name, value })),
  writeFormat,
  // no deviceRegistry => in-memory registry (lib/lwm2m-server.js:122-128), no MongoDB
};
if (acceptFormat) libConfig.defaultAcceptFormat = acceptFormat;

// ---------------------------------------------------------------------------------------
// State
// ---------------------------------------------------------------------------------------

let serverInfo = null;
let boundPort = null;
let shuttingDown = false;
const extra = new Map(); // endpoint -> { query, params, lwm2m, binding, objects }
const observations = new Map(); // `${endpoint}|${path}` -> { endpoint, path, deviceId, parts }
const pending = new Map(); // ctx -> true, commands not yet answered

function registry() {
  return lib.getRegistry();
}

function parseQuery(query) {
  const params = {};
  if (!query) return params;
  for (const part of query.split('&')) {
    if (part === '') continue;
    const eq = part.indexOf('=');
    if (eq < 0) params[part] = null; // flag, e.g. LwM2M 1.1 queue mode "Q"
    else params[part.slice(0, eq)] = part.slice(eq + 1);
  }
  return params;
}

function lifetimeValue(lt) {
  if (lt === undefined || lt === null || lt === '') return null;
  return /^\d+$/.test(String(lt)) ? Number(lt) : String(lt);
}

function locationOf(device) {
  return (libConfig.baseRoot ? libConfig.baseRoot + '/' : '') + 'rd/' + device.id;
}

function describeDevice(device) {
  const x = extra.get(device.name) || {};
  return {
    endpoint: device.name,
    address: device.address,
    port: device.port,
    lifetime: lifetimeValue(device.lifetime),
    location: locationOf(device),
    lwm2m: x.lwm2m === undefined ? null : x.lwm2m,
    binding: x.binding === undefined ? null : x.binding,
    query: x.query === undefined ? null : x.query,
    params: x.params || {},
    objects: x.objects === undefined ? null : x.objects,
    registeredAt: device.creationDate ? new Date(device.creationDate).toISOString() : null,
  };
}

function dropObservationsOf(endpoint) {
  for (const [key, o] of observations) {
    if (o.endpoint === endpoint) observations.delete(key);
  }
}

// ---------------------------------------------------------------------------------------
// Registration interface (device -> server)
// ---------------------------------------------------------------------------------------

// dataHandler (lib/services/coapRouter.js:60) calls handlers[op].lib(req, res, userHandler).
// We wrap .lib so our user handlers also see the raw request (source address, full query)
// and so rejected requests are reported.
function wrapLibHandler(op, userHandler) {
  const h = serverInfo.handlers[op];
  const origLib = h.lib;
  h.lib = function (req, res, _user) {
    const origEnd = res.end;
    res.end = function (...args) {
      if (typeof res.code === 'string' && !res.code.startsWith('2.')) {
        emit({
          event: 'rejected',
          operation: op,
          code: res.code,
          reason: typeof args[0] === 'string' ? args[0] : null,
          address: req.rsinfo.address,
          port: req.rsinfo.port,
          method: req.method,
          url: req.url,
        });
      }
      return origEnd.apply(this, args);
    };
    return origLib(req, res, (...args) => userHandler(req, ...args));
  };
}

function onRegistration(req, ep, lt, lwm2mVersion, binding, payload, callback) {
  registry().getByName(ep, (err, device) => {
    if (err || !device) {
      callback(); // cannot happen: the lib stored it just before calling us
      return;
    }
    const query = (req.urlObj && req.urlObj.query) || '';
    extra.set(ep, {
      query,
      params: parseQuery(query),
      lwm2m: lwm2mVersion,
      binding,
      objects: payload,
    });
    dropObservationsOf(ep); // a new registration invalidates old observations
    emit(Object.assign({ event: 'registration' }, describeDevice(device), {
      // the source address/port the server saw for this Register datagram
      address: req.rsinfo.address,
      port: req.rsinfo.port,
    }));
    callback();
  });
}

function onUpdate(req, device, payload, callback) {
  const query = (req.urlObj && req.urlObj.query) || '';
  const params = parseQuery(query);
  const x = extra.get(device.name) || {};
  if (params.lwm2m !== undefined) x.lwm2m = params.lwm2m;
  if (params.b !== undefined) x.binding = params.b;
  if (payload) x.objects = payload;
  x.lastUpdateQuery = query;
  extra.set(device.name, x);
  emit({
    event: 'update',
    endpoint: device.name,
    address: req.rsinfo.address,
    port: req.rsinfo.port,
    lifetime: lifetimeValue(device.lifetime),
    location: locationOf(device),
    query,
    params,
    objects: payload || null,
  });
  callback();
}

function onUnregistration(req, device, callback) {
  extra.delete(device.name);
  dropObservationsOf(device.name);
  emit({
    event: 'unregistration',
    endpoint: device.name,
    location: locationOf(device),
    reason: 'deregister',
    address: req.rsinfo.address,
    port: req.rsinfo.port,
  });
  callback();
}

function onLifetimeExpired(device, callback) {
  extra.delete(device.name);
  dropObservationsOf(device.name);
  emit({
    event: 'unregistration',
    endpoint: device.name,
    location: locationOf(device),
    reason: 'expired',
  });
  if (callback) callback();
}

// ---------------------------------------------------------------------------------------
// Commands (stdin)
// ---------------------------------------------------------------------------------------

class CmdError extends Error {
  constructor(kind, message, code) {
    super(message);
    this.kind = kind;
    if (code) this.code = code;
  }
}

function parsePath(path, { min = 1, max = 3 } = {}) {
  if (typeof path !== 'string') throw new CmdError('bad_request', '"path" must be a string like "/3/0/0"');
  const parts = path.replace(/^\//, '').split('/');
  if (parts.length < min || parts.length > max || !parts.every((p) => /^\d{1,5}$/.test(p) && Number(p) <= 65535)) {
    const shape = ['/O', '/O/I', '/O/I/R'].slice(min - 1, max).join(' or ');
    throw new CmdError('bad_request', `bad path ${JSON.stringify(path)}: expected ${shape}`);
  }
  return parts;
}

function normPath(parts) {
  return '/' + parts.join('/');
}

function needEndpoint(cmd) {
  if (typeof cmd.endpoint !== 'string' || cmd.endpoint === '') {
    throw new CmdError('bad_request', '"endpoint" must be a non-empty string');
  }
  return cmd.endpoint;
}

function resolveDevice(endpoint, cb) {
  registry().getByName(endpoint, (err, device) => {
    if (err || !device) cb(new CmdError('unknown_endpoint', `endpoint ${JSON.stringify(endpoint)} is not registered`));
    else cb(null, device);
  });
}

// Converts an error from the lib into our error shape, using the captured CoAP code.
function libError(err, ctx, expectedCode) {
  if (err instanceof CmdError) return err;
  const got = ctx.coap && ctx.coap.code;
  if (got && got !== expectedCode) {
    return new CmdError('coap_error', `device answered ${got}`, got);
  }
  const msg = (err && (err.message || err.name)) || String(err);
  return new CmdError('lib_error', msg, err && err.code);
}

const DEVICE_OPS = new Set(['read', 'write', 'execute', 'discover', 'observe', 'write-attributes']);

const ops = {
  ping(cmd, ctx, done) {
    done(null, 'pong');
  },

  list(cmd, ctx, done) {
    registry().list((err, devices) => {
      if (err) return done(err);
      done(null, devices.map(describeDevice).sort((a, b) => a.endpoint.localeCompare(b.endpoint)));
    });
  },

  observations(cmd, ctx, done) {
    done(null, [...observations.values()].map((o) => ({ endpoint: o.endpoint, path: o.path })));
  },

  read(cmd, ctx, done) {
    const ep = needEndpoint(cmd);
    const p = parsePath(cmd.path, { min: 1, max: 3 });
    resolveDevice(ep, (err, device) => {
      if (err) return done(err);
      // lib read() always builds '/O/I/R' (deviceManagement.js:61); empty segments are
      // dropped by node-coap's Uri-Path builder, so '' gives instance/object reads.
      lib.read(device.id, p[0], p[1] || '', p[2] || '', (e, value) => {
        if (e) return done(libError(e, ctx, '2.05'));
        done(null, value);
      });
    });
  },

  write(cmd, ctx, done) {
    const ep = needEndpoint(cmd);
    const p = parsePath(cmd.path, { min: 3, max: 3 });
    if (cmd.value === undefined || cmd.value === null || typeof cmd.value === 'object') {
      throw new CmdError('bad_request', '"value" must be a string, number or boolean');
    }
    resolveDevice(ep, (err, device) => {
      if (err) return done(err);
      lib.write(device.id, p[0], p[1], p[2], String(cmd.value), (e, payload) => {
        if (e) return done(libError(e, ctx, '2.04'));
        done(null, payload);
      });
    });
  },

  execute(cmd, ctx, done) {
    const ep = needEndpoint(cmd);
    const p = parsePath(cmd.path, { min: 3, max: 3 });
    if (cmd.value !== undefined && cmd.value !== null && typeof cmd.value === 'object') {
      throw new CmdError('bad_request', '"value" (execute arguments) must be a string if present');
    }
    const args = cmd.value === undefined || cmd.value === null ? undefined : String(cmd.value);
    resolveDevice(ep, (err, device) => {
      if (err) return done(err);
      lib.execute(device.id, p[0], p[1], p[2], args, (e, payload) => {
        if (e) return done(libError(e, ctx, '2.04'));
        done(null, payload);
      });
    });
  },

  discover(cmd, ctx, done) {
    const ep = needEndpoint(cmd);
    const p = parsePath(cmd.path, { min: 1, max: 3 });
    resolveDevice(ep, (err, device) => {
      if (err) return done(err);
      const cb = (e, value) => {
        if (e) return done(libError(e, ctx, '2.05'));
        done(null, value);
      };
      // discover() picks its callback by argument count (deviceManagement.js:223-245)
      if (p.length === 1) lib.discover(device.id, p[0], cb);
      else if (p.length === 2) lib.discover(device.id, p[0], p[1], cb);
      else lib.discover(device.id, p[0], p[1], p[2], cb);
    });
  },

  'write-attributes'(cmd, ctx, done) {
    const ep = needEndpoint(cmd);
    const p = parsePath(cmd.path, { min: 1, max: 3 });
    const attrs = cmd.attributes;
    if (!attrs || typeof attrs !== 'object' || Array.isArray(attrs)) {
      throw new CmdError('bad_request', '"attributes" must be an object, e.g. {"pmin":10,"pmax":60}');
    }
    resolveDevice(ep, (err, device) => {
      if (err) return done(err);
      lib.writeAttributes(device.id, p[0], p[1], p[2], attrs, (e, payload) => {
        if (e && e.name === 'UNSUPPORTED_ATTRIBUTES') return done(new CmdError('bad_request', e.message));
        if (e) return done(libError(e, ctx, '2.04'));
        done(null, payload);
      });
    });
  },

  observe(cmd, ctx, done) {
    const ep = needEndpoint(cmd);
    const p = parsePath(cmd.path, { min: 2, max: 3 });
    const path = normPath(p);
    const key = ep + '|' + path;
    resolveDevice(ep, (err, device) => {
      if (err) return done(err);
      const start = () => {
        const obs = { endpoint: ep, path, deviceId: device.id, parts: [p[0], p[1], p[2] || ''] };
        const handler = (value) => {
          if (observations.get(key) !== obs) return;
          emit({ event: 'notification', endpoint: ep, path, value });
        };
        lib.observe(device.id, p[0], p[1], p[2] || '', handler, (e, first) => {
          if (ctx.finished) {
            // We already answered (timeout): don't leave an orphan observation behind.
            if (!e) cancelLibObservation(obs, () => {});
            return;
          }
          if (e) return done(libError(e, ctx, '2.05'));
          observations.set(key, obs);
          done(null, first);
        });
      };
      const old = observations.get(key);
      if (old) {
        observations.delete(key);
        cancelLibObservation(old, start);
      } else {
        start();
      }
    });
  },

  cancel(cmd, ctx, done) {
    const ep = needEndpoint(cmd);
    const p = parsePath(cmd.path, { min: 2, max: 3 });
    const key = ep + '|' + normPath(p);
    const obs = observations.get(key);
    if (!obs) throw new CmdError('not_observing', `no active observation of ${normPath(p)} on ${JSON.stringify(ep)}`);
    observations.delete(key);
    cancelLibObservation(obs, (e) => done(e || null, null));
  },
};

// lib.cancelObserver throws a TypeError for an unknown subscription
// (informationReporting.js:223), so check the lib's own list first.
function cancelLibObservation(obs, cb) {
  const id = lib.buildObserverId(obs.deviceId, obs.parts[0], obs.parts[1], obs.parts[2]);
  lib.listObservers((err, list) => {
    if (err || !list.some((l) => l.id === id)) return cb();
    try {
      lib.cancelObserver(obs.deviceId, obs.parts[0], obs.parts[1], obs.parts[2], () => cb());
    } catch (e) {
      cb();
    }
  });
}

function reply(id, error, result, ctx) {
  if (error) {
    const out = { id, ok: false, error: error.message || String(error), kind: error.kind || 'lib_error' };
    if (error.code) out.code = error.code;
    if (ctx && ctx.coap) out.coap = ctx.coap;
    emit(out);
  } else {
    const out = { id, ok: true, result: result === undefined ? null : result };
    if (ctx && ctx.coap) out.coap = ctx.coap;
    emit(out);
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
  const op = typeof cmd.op === 'string' && Object.prototype.hasOwnProperty.call(ops, cmd.op) ? ops[cmd.op] : null;
  if (!op) {
    reply(id, new CmdError('bad_request', `unknown op ${JSON.stringify(cmd.op)}; known: ${Object.keys(ops).join(', ')}`));
    return;
  }
  if (shuttingDown || !serverInfo) {
    reply(id, new CmdError('unavailable', 'server is not running'));
    return;
  }
  let timeoutMs = opts.requestTimeoutMs;
  if (cmd.timeoutMs !== undefined) {
    if (!Number.isInteger(cmd.timeoutMs) || cmd.timeoutMs < 1 || cmd.timeoutMs > 3600000) {
      reply(id, new CmdError('bad_request', '"timeoutMs" must be an integer in 1..3600000'));
      return;
    }
    timeoutMs = cmd.timeoutMs;
  }

  const ctx = { id, op: cmd.op, finished: false, coap: null, sent: null, timer: null };
  const done = (err, result) => {
    if (ctx.finished) return;
    ctx.finished = true;
    clearTimeout(ctx.timer);
    pending.delete(ctx);
    reply(id, err, result, ctx);
  };
  ctx.done = done;
  pending.set(ctx, true);
  if (DEVICE_OPS.has(cmd.op)) {
    ctx.timer = setTimeout(() => {
      const msg = ctx.coap
        ? `no result from lwm2m-node-lib within ${timeoutMs} ms although the device answered ${ctx.coap.code}` +
          ' (see "coap"; e.g. the lib ignores an Observe response whose Observe option is 0)'
        : `no answer from device within ${timeoutMs} ms`;
      done(new CmdError('timeout', msg));
    }, timeoutMs);
  }
  als.run(ctx, () => {
    try {
      op(cmd, ctx, done);
    } catch (e) {
      done(e instanceof CmdError ? e : new CmdError('lib_error', e && e.message ? e.message : String(e)));
    }
  });
}

// ---------------------------------------------------------------------------------------
// Life cycle
// ---------------------------------------------------------------------------------------

function shutdown(code) {
  if (shuttingDown) return;
  shuttingDown = true;
  for (const ctx of pending.keys()) {
    if (!ctx.finished) {
      ctx.finished = true;
      clearTimeout(ctx.timer);
      reply(ctx.id, new CmdError('unavailable', 'server shutting down'));
    }
  }
  pending.clear();
  const force = setTimeout(() => process.exit(code), 1000);
  force.unref();
  if (!serverInfo) {
    process.exit(code);
    return;
  }
  try {
    lib.stop(serverInfo, () => process.exit(code));
  } catch (e) {
    process.exit(code);
  }
}

process.on('SIGTERM', () => shutdown(0));
process.on('SIGINT', () => shutdown(0));

// A test peer should survive odd datagrams: report instead of dying.
process.on('uncaughtException', (e) => {
  process.stderr.write('[lwm2m-peer] uncaught exception: ' + (e && e.stack ? e.stack : e) + '\n');
  emit({ event: 'error', error: e && e.message ? e.message : String(e) });
});

lib.start(libConfig, (error, info) => {
  if (error) {
    process.stderr.write('[lwm2m-peer] failed to start: ' + (error.message || JSON.stringify(error)) + '\n');
    emit({ event: 'error', error: 'failed to start: ' + (error.message || error.code || String(error)) });
    process.exit(1);
    return;
  }
  serverInfo = info;
  const addr = serverInfo.server._sock.address();
  boundPort = addr.port;
  // deviceManagement/informationReporting send each request to 127.0.0.1:config.port
  // (they keep a reference to this object), so --port 0 needs the real port here.
  libConfig.port = boundPort;

  // Our wrappers call our handlers directly, so lib.setHandler() is not used: it would
  // also restart the lifetime check with config.lifetimeCheckInterval read from the
  // wrong object (undefined => a 1 ms setInterval, lib/lwm2m-server.js:187).
  wrapLibHandler('registration', onRegistration);
  wrapLibHandler('updateRegistration', onUpdate);
  wrapLibHandler('unregistration', onUnregistration);
  // start() runs the lifetime check without a handler (expired devices vanish silently,
  // lib/lwm2m-server.js:149); restart it with one so expiries are reported.
  registry().checkLifetime(opts.lifetimeCheckMs, onLifetimeExpired);

  diag(`listening on ${addr.address}:${addr.port}`);
  emit({ event: 'listening', host: addr.address, port: boundPort });

  const rl = readline.createInterface({ input: process.stdin, crlfDelay: Infinity });
  rl.on('line', (line) => {
    try {
      handleLine(line);
    } catch (e) {
      reply(null, new CmdError('lib_error', e && e.message ? e.message : String(e)));
    }
  });
  rl.on('close', () => shutdown(0));
});

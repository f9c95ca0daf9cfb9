'use strict';

// Small, explicit adjustments to the `coap` package that lwm2m-node-lib uses.
// Shared by server.js and smoke-test.js.
//
// lwm2m-node-lib 1.4.0 calls `libcoap.createServer({...}).listen(config.port, cb)`
// (lib/services/coapRouter.js:128 and :141) without an address, so node-coap binds
// 0.0.0.0 (coap/lib/server.js:225, `bind(port, address || null)`), and it has no config
// option for the address. Its outgoing requests use a fresh `new coap.Agent()` per
// request (lib/services/server/coapUtils.js:68) whose socket is implicitly bound to
// 0.0.0.0:<ephemeral> as well. We patch both, on the *same* coap module instance the
// library loads, so every socket this process opens is bound to the given host.

const path = require('path');

const LIB_DIR = path.dirname(require.resolve('lwm2m-node-lib/package.json'));

// Resolve a dependency exactly as lwm2m-node-lib resolves it (same module instance).
function requireFromLib(name) {
  return require(require.resolve(name, { paths: [LIB_DIR] }));
}

const coap = requireFromLib('coap');

// Content formats, by number. The name is what node-coap reports in
// res.headers['Content-Format'] and what it accepts for Accept/Content-Format options.
// 1541..1544 are the pre-standard OMA numbers lwm2m-node-lib uses (its default write
// format is 'lightweightm2m/text' = 1541, lib/services/OMAContentFormats.json).
const KNOWN_FORMATS = [
  ['text/plain', 0],
  ['application/link-format', 40],
  ['application/xml', 41],
  ['application/octet-stream', 42],
  ['application/exi', 47],
  ['application/json', 50],
  ['application/cbor', 60],
  ['application/senml+json', 110],
  ['application/senml+cbor', 112],
  ['lightweightm2m/text', 1541],
  ['lightweightm2m/tlv', 1542],
  ['lightweightm2m/json', 1543],
  ['lightweightm2m/opaque', 1544],
  ['application/vnd.oma.lwm2m+tlv', 11542],
  ['application/vnd.oma.lwm2m+json', 11543],
  ['application/vnd.oma.lwm2m+cbor', 11544],
];

const formatNumberByName = new Map();
const formatNameByNumber = new Map();

// node-coap throws 'No matching format found' from IncomingMessage construction when a
// response carries a Content-Format number it has no name for; inside coap's Agent that
// throw happens in a dgram 'message' handler and would kill the process
// (coap/lib/option_converter.js contentFormatToString, coap/lib/agent.js _handle).
// So register every 16-bit number: unknown ones get their decimal string as name.
let formatsRegistered = false;
function registerAllFormats() {
  if (formatsRegistered) return;
  formatsRegistered = true;
  for (let n = 0; n <= 0xffff; n++) {
    coap.registerFormat(String(n), n);
  }
  for (const [name, value] of KNOWN_FORMATS) {
    coap.registerFormat(name, value); // last registration wins for number -> name
    formatNumberByName.set(name, value);
    formatNameByNumber.set(value, name);
  }
}

// Accepts a registered name ("text/plain") or a number (0, "11542"); returns the name
// node-coap expects.
function formatName(spec) {
  if (spec === undefined || spec === null || spec === '') return undefined;
  const s = String(spec);
  if (/^\d+$/.test(s)) {
    const n = Number(s);
    if (n > 0xffff) throw new Error('content format out of range: ' + s);
    return formatNameByNumber.get(n) || String(n);
  }
  if (!formatNumberByName.has(s)) throw new Error('unknown content format name: ' + s);
  return s;
}

// Number for a name reported by node-coap (or null).
function formatNumber(name) {
  if (name === undefined || name === null) return null;
  if (formatNumberByName.has(name)) return formatNumberByName.get(name);
  if (/^\d+$/.test(String(name))) return Number(name);
  return null;
}

let boundHost = null;
function bindAllSocketsTo(host) {
  if (boundHost !== null) {
    if (boundHost !== host) throw new Error('coap already patched for ' + boundHost);
    return;
  }
  boundHost = host;
  const net = require('net');
  const hostFamily = net.isIPv6(host) ? 'udp6' : 'udp4';

  // 1. Servers: default the listen address.
  const origCreateServer = coap.createServer;
  coap.createServer = function patchedCreateServer(...args) {
    const server = origCreateServer.apply(this, args);
    const origListen = server.listen;
    server.listen = function patchedListen(port, address, done) {
      if (typeof address === 'function') {
        done = address;
        address = undefined;
      }
      return origListen.call(this, port, address || host, done);
    };
    return server;
  };

  // 2. Agents (client side of every request): bind the implicit socket to host too.
  const Agent = coap.Agent;
  const origInit = Agent.prototype._init;
  Agent.prototype._init = function patchedInit(socket) {
    const fresh = !this._sock;
    origInit.call(this, socket);
    if (fresh && !socket && !this._opts.port && this._sock && this._opts.type === hostFamily) {
      // dgram queues sends issued while the bind is in progress.
      this._sock.bind(0, host);
    }
  };
}

module.exports = {
  LIB_DIR,
  requireFromLib,
  coap,
  KNOWN_FORMATS,
  registerAllFormats,
  formatName,
  formatNumber,
  bindAllSocketsTo,
};

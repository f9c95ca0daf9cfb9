'use strict';
// Process plumbing shared by the JSON-lines drivers (server.js, client.js): quiet the
// warnings lwm2m-node-lib's unused mongoose dependency prints, drop LWM2M_* environment
// variables that would override the drivers' arguments, and write protocol lines to stdout
// (diagnostics to stderr) without dying when the parent closes the pipe.

function setupProcess({ tag, verbose, onStdoutBroken }) {
  process.removeAllListeners('warning');
  process.on('warning', (w) => {
    if (verbose) process.stderr.write(`[${tag}] ${w.name}: ${w.message}\n`);
  });
  for (const k of Object.keys(process.env)) {
    if (k.startsWith('LWM2M_')) delete process.env[k];
  }
  let stdoutBroken = false;
  process.stdout.on('error', () => {
    stdoutBroken = true;
    onStdoutBroken();
  });
  return {
    emit(obj) {
      if (stdoutBroken) return;
      process.stdout.write(JSON.stringify(obj) + '\n');
    },
    diag(...args) {
      if (verbose) process.stderr.write(`[${tag}] ` + args.join(' ') + '\n');
    },
  };
}

module.exports = { setupProcess };

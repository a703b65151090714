// Start and stop a sandbox server as a child process on a free port (tests and bench/perf.mjs).

import { spawn } from 'node:child_process';
import { once } from 'node:events';
import { fileURLToPath } from 'node:url';

export const SERVER = fileURLToPath(new URL('./server.mjs', import.meta.url));

// Resolves once the server prints its address: { child, root, fhir, output() }.
export async function startServer(args = [], { server = SERVER, stderr = 'pipe' } = {}) {
  const child = spawn(process.execPath, [server, '--port', '0', ...args], { stdio: ['ignore', 'pipe', stderr] });
  let errors = '';
  child.stderr?.on('data', (d) => (errors += d));
  let stdout = '';
  const root = await new Promise((resolve, reject) => {
    child.stdout.on('data', (d) => {
      stdout += d;
      const m = /sandbox listening on (http:\/\/\S+)\/fhir/.exec(stdout);
      if (m) resolve(m[1]);
    });
    child.on('exit', (code) => reject(new Error(`server exited ${code}: ${errors}`)));
  });
  return { child, root, fhir: `${root}/fhir`, output: () => stdout };
}

// SIGTERM and wait; returns the exit code.
export async function stopServer(server) {
  if (server.child.exitCode !== null) return server.child.exitCode;
  server.child.kill('SIGTERM');
  const [code] = await once(server.child, 'exit');
  return code;
}

import { execFile, execFileSync, spawnSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { freePort } from './free-port.ts';
import { required } from './storage.ts';

/**
 * A PostgreSQL cluster of the test's own (initdb + pg_ctl from `pg_config --bindir`), for tests that
 * stop and start the database under a running Custos. It never touches the shared server: its data
 * directory is in a fresh temp directory, it listens on 127.0.0.1 and a free port only, and its
 * socket lives in that temp directory. As root (the CI machines) it runs as user `postgres`.
 *
 * Local (socket) connections trust; TCP connections need the password (SCRAM-SHA-256), so a URL
 * that works proves its password is right.
 */
export interface PrivateCluster {
  port: number;
  /** postgres://postgres:…@127.0.0.1:port/db (the superuser). */
  adminUrl(db?: string): string;
  stop(mode?: 'immediate' | 'fast'): Promise<void>;
  start(): Promise<void>;
  /** Stops the cluster (if running) and removes its directory. Safe to call twice. */
  destroy(): Promise<void>;
}

interface Tools {
  bindir: string;
  /** Command prefix running a program as the cluster's owner. */
  asOwner: string[];
  uid: number | undefined;
  gid: number | undefined;
}

function tools(): Tools | string {
  let bindir: string;
  try {
    bindir = execFileSync('pg_config', ['--bindir'], {
      encoding: 'utf8',
      stdio: ['ignore', 'pipe', 'ignore'],
    }).trim();
  } catch {
    return 'pg_config not found (install the PostgreSQL server package)';
  }
  for (const p of ['initdb', 'pg_ctl', 'postgres'])
    if (!fs.existsSync(path.join(bindir, p))) return `${p} not found in ${bindir}`;
  if (process.getuid?.() !== 0) return { bindir, asOwner: [], uid: undefined, gid: undefined };
  // PostgreSQL refuses to run as root: run it as the `postgres` user.
  let uid: number, gid: number;
  try {
    uid = Number(execFileSync('id', ['-u', 'postgres'], { encoding: 'utf8' }).trim());
    gid = Number(execFileSync('id', ['-g', 'postgres'], { encoding: 'utf8' }).trim());
  } catch {
    return 'running as root and there is no user postgres to run the cluster as';
  }
  const runuser = ['/usr/sbin/runuser', '/sbin/runuser', '/usr/bin/runuser'].find((p) => fs.existsSync(p));
  if (!runuser) return 'running as root and runuser is not available';
  return { bindir, asOwner: [runuser, '-u', 'postgres', '--'], uid, gid };
}

/** For node:test's `skip`: false when a private cluster can be made, else why not (a failure when required). */
export function needsPrivatePostgres(): false | string {
  const t = tools();
  if (typeof t !== 'string') return false;
  if (required.has('postgres')) throw new Error(`CUSTOS_TEST_REQUIRE includes postgres, but ${t}`);
  return `no private PostgreSQL cluster: ${t}`;
}

function argvFor(t: Tools, program: string, args: string[]): string[] {
  return [...t.asOwner, path.join(t.bindir, program), ...args];
}

function run(t: Tools, program: string, args: string[], timeoutMs = 120_000): Promise<string> {
  const argv = argvFor(t, program, args);
  return new Promise((resolve, reject) => {
    execFile(argv[0]!, argv.slice(1), { timeout: timeoutMs, encoding: 'utf8' }, (err, stdout, stderr) => {
      if (err) reject(new Error(`${program} failed: ${stderr || stdout || err.message}`));
      else resolve(stdout);
    });
  });
}

export async function startPrivateCluster(): Promise<PrivateCluster> {
  const t = tools();
  if (typeof t === 'string') throw new Error(t);
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'custos-private-pg-'));
  if (t.uid !== undefined) fs.chownSync(dir, t.uid, t.gid!);
  fs.chmodSync(dir, 0o700);
  const data = path.join(dir, 'data');
  const password = randomBytes(12).toString('hex');
  const pwfile = path.join(dir, 'pwfile');
  fs.writeFileSync(pwfile, `${password}\n`, { mode: 0o600 });
  if (t.uid !== undefined) fs.chownSync(pwfile, t.uid, t.gid!);
  const port = await freePort();
  let running = false;

  // Last resort if the test process exits without its after() hook running (a crash, Ctrl-C).
  const emergency = () => {
    if (running) {
      const argv = argvFor(t, 'pg_ctl', ['-D', data, '-m', 'immediate', 'stop']);
      spawnSync(argv[0]!, argv.slice(1), { stdio: 'ignore', timeout: 30_000 });
    }
    fs.rmSync(dir, { recursive: true, force: true });
  };
  process.once('exit', emergency);

  const cluster: PrivateCluster = {
    port,
    adminUrl: (db = 'postgres') => `postgres://postgres:${password}@127.0.0.1:${port}/${db}`,
    async start() {
      // fsync off: the test stops the server (a process crash at worst), never the machine.
      const opts = `-p ${port} -k ${dir} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=40 -c shared_buffers=16MB`;
      await run(t, 'pg_ctl', [
        '-D',
        data,
        '-l',
        path.join(dir, 'server.log'),
        '-w',
        '-t',
        '60',
        '-o',
        opts,
        'start',
      ]);
      running = true;
    },
    async stop(mode = 'immediate') {
      if (!running) return;
      await run(t, 'pg_ctl', ['-D', data, '-m', mode, '-w', 'stop']);
      running = false;
    },
    async destroy() {
      try {
        await cluster.stop('immediate');
      } catch {
        /* already down */
      } finally {
        process.removeListener('exit', emergency);
        fs.rmSync(dir, { recursive: true, force: true });
      }
    },
  };
  try {
    await run(t, 'initdb', [
      '-D',
      data,
      '-U',
      'postgres',
      '--auth-local=trust',
      '--auth-host=scram-sha-256',
      `--pwfile=${pwfile}`,
      '--encoding=UTF8',
      '--locale=C',
      '--no-sync',
    ]);
    await cluster.start();
  } catch (e) {
    await cluster.destroy();
    throw e;
  }
  return cluster;
}

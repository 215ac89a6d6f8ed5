import { findExecutable, type TestPki } from './test-pki.ts';
import { spawn, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { required } from './storage.ts';

/**
 * A real rsyslog receiving RFC 5425 syslog over TLS on loopback, for the SIEM forwarding tests
 * (Debian packages rsyslog and rsyslog-gnutls). Each instance runs in the foreground
 * (`rsyslogd -n -f <conf> -i <pidfile>`) with its own config, work directory, pid file and output
 * file under a temp dir; the system rsyslog service is never touched. Certificates come from the
 * `openssl` CLI (node:crypto cannot issue X.509 certificates).
 *
 * Without rsyslogd, its gtls driver or openssl the tests skip, saying so; CUSTOS_TEST_REQUIRE=rsyslog
 * (as .ci/run sets) makes that a failure.
 */

const MODULE_DIRS = [
  '/usr/lib/x86_64-linux-gnu/rsyslog',
  '/usr/lib/aarch64-linux-gnu/rsyslog',
  '/usr/lib/rsyslog',
  '/usr/lib64/rsyslog',
];

/** For node:test's `skip`: false when rsyslog with gtls and openssl are installed, else why not. */
export function needsRsyslog(): false | string {
  const missing = !findExecutable('rsyslogd')
    ? 'rsyslogd not found'
    : !MODULE_DIRS.some((d) => fs.existsSync(path.join(d, 'lmnsd_gtls.so')))
      ? 'the rsyslog gtls driver (lmnsd_gtls.so) not found'
      : !findExecutable('openssl')
        ? 'openssl not found'
        : undefined;
  if (!missing) return false;
  if (required.has('rsyslog')) {
    throw new Error(
      `CUSTOS_TEST_REQUIRE includes rsyslog, but ${missing} (apt-get install rsyslog rsyslog-gnutls)`,
    );
  }
  return `rsyslog not installed (${missing}): apt-get install rsyslog rsyslog-gnutls to run this test`;
}

export { makePki, type TestPki } from './test-pki.ts';

function waitForPort(port: number, child: ChildProcess, timeoutMs: number): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  return new Promise((resolve, reject) => {
    const attempt = () => {
      if (child.exitCode !== null) {
        reject(new Error(`rsyslogd exited with ${child.exitCode} before listening`));
        return;
      }
      const s = net.connect({ host: '127.0.0.1', port });
      s.once('connect', () => {
        s.destroy();
        resolve();
      });
      s.once('error', () => {
        s.destroy();
        if (Date.now() > deadline)
          reject(new Error(`rsyslogd did not listen on ${port} within ${timeoutMs} ms`));
        else setTimeout(attempt, 100);
      });
    };
    attempt();
  });
}

/** One rsyslogd: imtcp with the gtls stream driver (TLS only), every message's raw text to `outFile`. */
export class Rsyslog {
  private child: ChildProcess | undefined;
  private stderr = '';
  readonly outFile: string;
  private readonly conf: string;
  private readonly pidFile: string;

  constructor(
    readonly dir: string,
    readonly port: number,
    pki: TestPki,
    /** `anon`: any client (server-authenticated TLS); `x509/certvalid`: clients need a certificate of the CA. */
    authMode: 'anon' | 'x509/certvalid' = 'anon',
  ) {
    fs.mkdirSync(path.join(dir, 'work'), { recursive: true });
    this.outFile = path.join(dir, 'received.log');
    this.conf = path.join(dir, 'rsyslog.conf');
    this.pidFile = path.join(dir, 'rsyslogd.pid');
    // %rawmsg% is the message exactly as received, the octet-counting frame removed. The default
    // maxMessageSize (8 KiB) stays: Custos must fit in what a stock receiver accepts.
    fs.writeFileSync(
      this.conf,
      `global(
  workDirectory="${path.join(dir, 'work')}"
  defaultNetstreamDriver="gtls"
  defaultNetstreamDriverCAFile="${pki.caFile}"
  defaultNetstreamDriverCertFile="${pki.serverCert}"
  defaultNetstreamDriverKeyFile="${pki.serverKey}"
)
module(load="imtcp" streamDriver.name="gtls" streamDriver.mode="1" streamDriver.authMode="${authMode}")
template(name="custosRaw" type="string" string="%rawmsg%\\n")
ruleset(name="custos") {
  action(type="omfile" file="${this.outFile}" template="custosRaw")
}
input(type="imtcp" address="127.0.0.1" port="${port}" ruleset="custos")
`,
    );
  }

  async start(): Promise<void> {
    if (this.child) throw new Error('rsyslogd already running');
    const child = spawn(findExecutable('rsyslogd')!, ['-n', '-f', this.conf, '-i', this.pidFile], {
      stdio: ['ignore', 'ignore', 'pipe'],
    });
    child.stderr!.on('data', (d) => (this.stderr = (this.stderr + String(d)).slice(-4000)));
    this.child = child;
    try {
      await waitForPort(this.port, child, 10_000);
    } catch (e) {
      await this.stop();
      throw new Error(`${(e as Error).message}; stderr: ${this.stderr}`, { cause: e });
    }
  }

  /** SIGTERM (rsyslog flushes and closes its connections), SIGKILL after 10 s. */
  async stop(): Promise<void> {
    const child = this.child;
    if (!child) return;
    this.child = undefined;
    if (child.exitCode !== null || child.signalCode !== null) return;
    await new Promise<void>((resolve) => {
      const timer = setTimeout(() => child.kill('SIGKILL'), 10_000);
      child.once('exit', () => {
        clearTimeout(timer);
        resolve();
      });
      child.kill('SIGTERM');
    });
  }

  get running(): boolean {
    return this.child !== undefined;
  }

  /** Every message received so far, one per line. */
  lines(): string[] {
    try {
      return fs.readFileSync(this.outFile, 'utf8').split('\n').filter(Boolean);
    } catch {
      return [];
    }
  }
}

import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';

const SBIN_DIRS = ['/usr/sbin', '/sbin', '/usr/local/sbin'];

/** An executable on PATH or in the sbin directories (openssl, rsyslogd), or undefined. */
export function findExecutable(name: string): string | undefined {
  for (const dir of (process.env.PATH ?? '').split(':').concat(SBIN_DIRS, ['/usr/bin', '/bin'])) {
    const p = path.join(dir, name);
    if (dir && fs.existsSync(p)) return p;
  }
  return undefined;
}

/** A throwaway PKI: a CA, a server certificate for 127.0.0.1 only, a client certificate, another CA. */
export interface TestPki {
  caFile: string;
  serverCert: string;
  serverKey: string;
  clientCert: string;
  clientKey: string;
  /** A CA that signed nothing here: trusting it instead of `caFile` must fail verification. */
  otherCaFile: string;
}

function openssl(args: string[], cwd: string): void {
  execFileSync(findExecutable('openssl')!, args, { cwd, stdio: ['ignore', 'pipe', 'pipe'] });
}

/** `serverSan`: the server certificate's subjectAltName (default: the address 127.0.0.1 only). */
export function makePki(dir: string, opts: { serverSan?: string } = {}): TestPki {
  fs.mkdirSync(dir, { recursive: true });
  const ec = ['-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes'];
  const ca = (name: string, cn: string) =>
    openssl(
      [
        'req',
        '-x509',
        ...ec,
        '-keyout',
        `${name}.key`,
        '-out',
        `${name}.pem`,
        '-days',
        '2',
        '-subj',
        `/CN=${cn}`,
        '-addext',
        'basicConstraints=critical,CA:TRUE',
        '-addext',
        'keyUsage=critical,keyCertSign,cRLSign',
      ],
      dir,
    );
  ca('ca', 'Custos Test CA');
  ca('other-ca', 'Custos Test Unrelated CA');
  const leaf = (name: string, cn: string, ext: string) => {
    openssl(['req', ...ec, '-keyout', `${name}.key`, '-out', `${name}.csr`, '-subj', `/CN=${cn}`], dir);
    fs.writeFileSync(path.join(dir, `${name}.ext`), ext);
    openssl(
      [
        'x509',
        '-req',
        '-in',
        `${name}.csr`,
        '-CA',
        'ca.pem',
        '-CAkey',
        'ca.key',
        '-CAcreateserial',
        '-out',
        `${name}.pem`,
        '-days',
        '2',
        '-extfile',
        `${name}.ext`,
      ],
      dir,
    );
  };
  const common = 'keyUsage=critical,digitalSignature\nbasicConstraints=CA:FALSE\n';
  leaf(
    'server',
    '127.0.0.1',
    `subjectAltName=${opts.serverSan ?? 'IP:127.0.0.1'}\nextendedKeyUsage=serverAuth\n${common}`,
  );
  leaf('client', 'custos-test-client', `extendedKeyUsage=clientAuth\n${common}`);
  const f = (n: string) => path.join(dir, n);
  return {
    caFile: f('ca.pem'),
    serverCert: f('server.pem'),
    serverKey: f('server.key'),
    clientCert: f('client.pem'),
    clientKey: f('client.key'),
    otherCaFile: f('other-ca.pem'),
  };
}

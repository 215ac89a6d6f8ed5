import fs from 'node:fs';
import { X509Certificate } from 'node:crypto';
import { ConfigError } from './config.ts';

/**
 * PEM files named by configuration (CA bundles, client certificates), read at start so that a
 * wrong path or a file that is not a certificate stops the server with the variable's name.
 */

export function readPem(variable: string, file: string): Buffer {
  try {
    return fs.readFileSync(file);
  } catch (e) {
    const code = (e as { code?: string }).code ?? 'unreadable';
    throw new ConfigError(variable, `cannot read ${file} (${code})`);
  }
}

export function certificates(variable: string, file: string, pem: Buffer): void {
  const blocks = pem.toString('utf8').match(/-----BEGIN CERTIFICATE-----[\s\S]+?-----END CERTIFICATE-----/g);
  if (!blocks) throw new ConfigError(variable, `${file} holds no PEM certificate`);
  for (const b of blocks) {
    try {
      new X509Certificate(b);
    } catch {
      throw new ConfigError(variable, `${file} holds a certificate that does not parse`);
    }
  }
}

import { isIP } from 'node:net';
import { connect as tlsConnect, type TLSSocket } from 'node:tls';
import type { Logger } from '../log/logger.ts';

/**
 * The egress port: the only way Custos code makes an outbound connection (JWKS fetches, KMS,
 * SIEM, webhooks, and the CLI's calls to a local server's admin API). Today it logs the
 * destination host and forwards; the PHI-boundary issue (7) makes it enforce the vendor registry,
 * BAAs, TLS and SSRF rules. The lint rule in eslint.config.js forbids other outbound clients in src.
 */
export interface EgressRequest {
  /** Why this connection is made, for the log and later the flow map, e.g. `admin-api`. */
  purpose: string;
  url: string;
  init?: RequestInit;
}

export async function egressFetch(req: EgressRequest, log?: Logger): Promise<Response> {
  const u = new URL(req.url);
  log?.info('egress.request', { code: req.purpose, host: u.hostname });
  return fetch(u, req.init);
}

/** An outbound TLS stream (`egressConnectTls`). */
export interface EgressTlsRequest {
  /** Why this connection is made, for the log and later the flow map, e.g. `audit-siem`. */
  purpose: string;
  /** A DNS name or an IP address (IPv6 with or without brackets). */
  host: string;
  port: number;
  /** PEM certificates to trust instead of Node's bundled roots (a private CA). */
  ca?: string | Buffer;
  /** Client certificate chain and key (PEM), for mutual TLS. */
  cert?: string | Buffer;
  key?: string | Buffer;
  /** Gives up on the TCP connect and TLS handshake after this long (default 10 s). */
  timeoutMs?: number;
  /** Aborts the connect (the promise rejects with code `ABORT_ERR`). */
  signal?: AbortSignal;
}

/**
 * Opens a TLS stream to `host:port` and resolves once the handshake has succeeded: TLS 1.2 or
 * newer, the server's certificate verified against `ca` (or Node's roots) and matched against the
 * host name or IP address (SNI set for names; RFC 6066 forbids it for addresses). There is no
 * option to turn verification off. Rejects with the socket's error, whose `code` names the problem
 * (`ECONNREFUSED`, `ETIMEDOUT`, `UNABLE_TO_VERIFY_LEAF_SIGNATURE`, `ERR_TLS_CERT_ALTNAME_INVALID`, …).
 *
 * Issue 7 adds here what `egressFetch` will also get: the vendor registry and BAA check of the
 * destination, SSRF rules (no private addresses unless allowed) and the PHI flow map.
 *
 * @example
 * const socket = await egressConnectTls({ purpose: 'audit-siem', host: 'siem.internal', port: 6514, ca }, log);
 * socket.write(frame);
 */
export function egressConnectTls(req: EgressTlsRequest, log?: Logger): Promise<TLSSocket> {
  const host = req.host.replace(/^\[(.*)\]$/, '$1');
  log?.info('egress.connect', { code: req.purpose, host, port: req.port });
  return new Promise((resolve, reject) => {
    const abort = () => fail(Object.assign(new Error('TLS connect aborted'), { code: 'ABORT_ERR' }));
    const socket = tlsConnect({
      host,
      port: req.port,
      servername: isIP(host) === 0 ? host : undefined,
      ca: req.ca,
      cert: req.cert,
      key: req.key,
      minVersion: 'TLSv1.2',
      rejectUnauthorized: true,
    });
    const fail = (e: Error) => {
      req.signal?.removeEventListener('abort', abort);
      socket.on('error', () => {}); // a late second error of a socket given up on
      socket.destroy();
      reject(e);
    };
    socket.setTimeout(req.timeoutMs ?? 10_000, () =>
      fail(Object.assign(new Error('TLS connect timed out'), { code: 'ETIMEDOUT' })),
    );
    if (req.signal?.aborted) abort();
    req.signal?.addEventListener('abort', abort, { once: true });
    socket.once('error', fail);
    socket.once('secureConnect', () => {
      socket.setTimeout(0);
      socket.off('error', fail);
      req.signal?.removeEventListener('abort', abort);
      // rejectUnauthorized already refused an unverified peer; this only makes the rule explicit.
      if (!socket.authorized) {
        fail(Object.assign(new Error('TLS peer not authorized'), { code: 'ERR_TLS_NOT_AUTHORIZED' }));
        return;
      }
      resolve(socket);
    });
  });
}

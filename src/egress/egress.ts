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

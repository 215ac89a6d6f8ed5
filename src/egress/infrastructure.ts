import type { DataClass, EndpointProtocol, Vendor } from './vendor-registry.ts';
import { normalizeHost } from './address-policy.ts';

/**
 * Infrastructure destinations (ADR 0009): what the operator configured through the environment
 * becomes a vendor of kind `infrastructure`, from the configuration, for as long as it names it.
 * The operator naming a host is its explicit registration: its exact host and port may be a
 * private or loopback address (an internal SIEM, a KMS VPC endpoint, a test witness), which the
 * SSRF rules otherwise refuse. None of them may receive PHI:
 *
 * - the KMS (CUSTOS_KMS_ENDPOINT, or AWS's regional endpoint): wrapped data keys, `none`;
 * - checkpoint witnesses (CUSTOS_AUDIT_WITNESSES): signed tree heads, `none`;
 * - the SIEM (CUSTOS_SIEM_URL): audit events, which name records by random ids assigned by Custos
 *   and carry PHI-bearing fields only sealed, `deidentified` (ids not derived from the individual,
 *   45 CFR 164.514(c));
 * - `self`: the CLI's calls to this installation's own admin API (server.json), which may carry
 *   anything the installation holds (it is not a disclosure: the data stays with its custodian).
 */

function endpointOf(url: URL, allowPrivate: boolean): Vendor['endpoints'][number] {
  const protocol: EndpointProtocol = url.protocol === 'http:' ? 'http' : 'https';
  const host = normalizeHost(url.hostname) ?? url.hostname;
  const port = url.port ? Number(url.port) : protocol === 'http' ? 80 : 443;
  return { endpointId: `${host}:${port}`, host, port, protocol, allowPrivate };
}

function infra(
  vendorId: string,
  name: string,
  configuredBy: string,
  phiClass: DataClass,
  endpoints: Vendor['endpoints'],
  services: string[],
  kind: Vendor['kind'] = 'infrastructure',
): Vendor {
  return {
    vendorId,
    name,
    kind,
    services,
    phiClass,
    endpoints: endpoints.map((e) => ({ ...e, endpointId: `${vendorId}:${e.endpointId}` })),
    baaState: 'none',
    configuredBy,
  };
}

/** A checkpoint witness (its submission prefix URL). */
export function witnessVendor(url: string, index = 0): Vendor {
  return infra(
    `infra-witness-${index + 1}`,
    `audit witness ${index + 1}`,
    'CUSTOS_AUDIT_WITNESSES',
    'none',
    [endpointOf(new URL(url), true)],
    ['audit-witness'],
  );
}

/** The SIEM receiving the audit log as syslog over TLS. */
export function siemVendor(host: string, port: number): Vendor {
  const h = normalizeHost(host) ?? host;
  return infra(
    'infra-siem',
    'SIEM',
    'CUSTOS_SIEM_URL',
    'deidentified',
    [{ endpointId: `${h}:${port}`, host: h, port, protocol: 'tls', allowPrivate: true }],
    ['audit-siem'],
  );
}

/** The KMS: the configured endpoint (operator-named, so private allowed), or AWS's public one. */
export function kmsVendor(region: string, endpoint?: string): Vendor {
  const ep = endpoint
    ? endpointOf(new URL(endpoint), true)
    : endpointOf(new URL(`https://kms.${region}.amazonaws.com`), false);
  return infra(
    'infra-kms',
    'key management service',
    endpoint ? 'CUSTOS_KMS_ENDPOINT' : 'CUSTOS_KMS_REGION',
    'none',
    [ep],
    ['aws-kms'],
  );
}

/** This installation's own admin API, as the CLI reaches it (the URL in server.json). */
export function selfVendor(url: string): Vendor {
  return infra(
    'self',
    'this Custos server',
    'server.json',
    'full',
    [endpointOf(new URL(url), true)],
    ['admin-api'],
    'self',
  );
}

/** The infrastructure destinations of a configuration. */
export function infrastructureVendors(config: {
  readonly siem?: { readonly host: string; readonly port: number } | undefined;
  readonly auditWitnesses?: readonly { readonly url: string }[];
  readonly kms?: { readonly region: string; readonly endpoint: string | undefined } | undefined;
}): Vendor[] {
  const out: Vendor[] = [];
  if (config.kms) out.push(kmsVendor(config.kms.region, config.kms.endpoint));
  if (config.siem) out.push(siemVendor(config.siem.host, config.siem.port));
  (config.auditWitnesses ?? []).forEach((w, i) => out.push(witnessVendor(w.url, i)));
  return out;
}

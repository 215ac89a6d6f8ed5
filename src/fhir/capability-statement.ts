import { searchParameters } from './search-parameters.ts';

/** Exactly the parameters the search engine supports for `type`: `_id`, `_lastUpdated` and the indexed ones. */
function searchParamsOf(type: string): { name: string; type: string; definition: string }[] {
  const out = [
    { name: '_id', type: 'token', definition: 'http://hl7.org/fhir/SearchParameter/Resource-id' },
    {
      name: '_lastUpdated',
      type: 'date',
      definition: 'http://hl7.org/fhir/SearchParameter/Resource-lastUpdated',
    },
  ];
  for (const p of searchParameters().indexed(type).values())
    out.push({ name: p.code, type: p.type, definition: p.url });
  return out.sort((a, b) => (a.name < b.name ? -1 : 1));
}

function includesOf(type: string): string[] {
  return [...searchParameters().indexed(type).values()]
    .filter((p) => p.type === 'reference')
    .map((p) => `${type}:${p.code}`)
    .sort();
}

/** AuditEvent is served from the audit log, read-only (src/audit/audit-query.ts, docs/audit.md). */
const AUDIT_EVENT_RESOURCE = {
  type: 'AuditEvent',
  documentation:
    'The audit log, read-only: an AuditEvent scope and purpose of use HCOMPL, HLEGAL, HSYSADMIN or PATRQT; every read is audited.',
  interaction: [{ code: 'read' }, { code: 'search-type' }],
  searchParam: [
    ['action', 'token'],
    ['agent', 'reference'],
    ['date', 'date'],
    ['outcome', 'token'],
    ['patient', 'reference'],
    ['purpose', 'token'],
  ].map(([name, type]) => ({
    name,
    type,
    // R4 defines no purpose parameter for AuditEvent (BALP searches purposeOfEvent): ours has no definition.
    definition: name === 'purpose' ? undefined : `http://hl7.org/fhir/SearchParameter/AuditEvent-${name}`,
    documentation: name === 'purpose' ? 'AuditEvent.purposeOfEvent (a v3-ActReason code)' : undefined,
  })),
};

/**
 * The CapabilityStatement at /fhir/R4/metadata. It states only what this version does: every
 * interaction and search parameter listed is implemented and tested.
 */
export function capabilityStatement(opts: {
  publicUrl: string;
  resourceTypes: Iterable<string>;
  version: string;
}): unknown {
  const resourceInteractions = [
    'read',
    'vread',
    'update',
    'patch',
    'delete',
    'history-instance',
    'history-type',
    'create',
    'search-type',
  ].map((code) => ({ code }));
  return {
    resourceType: 'CapabilityStatement',
    status: 'active',
    date: '2026-12-01',
    kind: 'instance',
    software: { name: 'Custos', version: opts.version },
    implementation: { description: 'Custos FHIR R4 server', url: `${opts.publicUrl}/fhir/R4` },
    fhirVersion: '4.0.1',
    format: ['application/fhir+json', 'application/json'],
    patchFormat: ['application/json-patch+json'],
    rest: [
      {
        mode: 'server',
        security: {
          cors: false,
          service: [
            {
              coding: [
                {
                  system: 'http://terminology.hl7.org/CodeSystem/restful-security-service',
                  code: 'SMART-on-FHIR',
                },
              ],
            },
          ],
          description:
            'SMART App Launch (standalone, authorization code with PKCE) and OAuth 2.0 client credentials (client secret or SMART Backend Services private_key_jwt). Every request needs a purpose of use (X-Purpose-Of-Use or the token).',
          extension: [
            {
              url: 'http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris',
              extension: [
                { url: 'authorize', valueUri: `${opts.publicUrl}/oauth/authorize` },
                { url: 'token', valueUri: `${opts.publicUrl}/oauth/token` },
                { url: 'introspect', valueUri: `${opts.publicUrl}/oauth/introspect` },
                { url: 'revoke', valueUri: `${opts.publicUrl}/oauth/revoke` },
              ],
            },
          ],
        },
        resource: [...opts.resourceTypes].sort().map((type) =>
          type === 'AuditEvent'
            ? AUDIT_EVENT_RESOURCE
            : {
                type,
                interaction: resourceInteractions,
                versioning: 'versioned-update',
                readHistory: true,
                updateCreate: true,
                conditionalCreate: true,
                conditionalRead: 'not-supported',
                conditionalUpdate: true,
                conditionalDelete: 'not-supported',
                referencePolicy: ['literal', 'local'],
                searchInclude: includesOf(type),
                searchRevInclude: ['Provenance:target'],
                searchParam: searchParamsOf(type),
              },
        ),
        interaction: [
          { code: 'transaction' },
          { code: 'batch' },
          { code: 'history-system' },
          { code: 'search-system' },
        ],
        searchParam: [
          { name: '_id', type: 'token', definition: 'http://hl7.org/fhir/SearchParameter/Resource-id' },
          {
            name: '_lastUpdated',
            type: 'date',
            definition: 'http://hl7.org/fhir/SearchParameter/Resource-lastUpdated',
          },
        ],
      },
    ],
  };
}

/**
 * SMART discovery (https://hl7.org/fhir/smart-app-launch/conformance.html): backend services, the
 * standalone launch and the EHR launch (from a launch created through the admin API: docs/users.md).
 */
export function smartConfiguration(publicUrl: string): unknown {
  return {
    issuer: publicUrl,
    jwks_uri: `${publicUrl}/oauth/jwks`,
    authorization_endpoint: `${publicUrl}/oauth/authorize`,
    token_endpoint: `${publicUrl}/oauth/token`,
    introspection_endpoint: `${publicUrl}/oauth/introspect`,
    revocation_endpoint: `${publicUrl}/oauth/revoke`,
    grant_types_supported: ['authorization_code', 'refresh_token', 'client_credentials'],
    response_types_supported: ['code'],
    token_endpoint_auth_methods_supported: [
      'client_secret_basic',
      'client_secret_post',
      'private_key_jwt',
      'none',
    ],
    token_endpoint_auth_signing_alg_values_supported: ['RS384', 'ES384', 'RS256', 'ES256'],
    scopes_supported: [
      'openid',
      'fhirUser',
      'launch',
      'launch/patient',
      'offline_access',
      'online_access',
      'patient/*.rs',
      'patient/*.cruds',
      'user/*.rs',
      'user/*.cruds',
      'system/*.cruds',
      'system/*.read',
      'system/*.write',
      'system/*.*',
    ],
    capabilities: [
      'launch-ehr',
      'launch-standalone',
      'client-public',
      'client-confidential-symmetric',
      'client-confidential-asymmetric',
      'context-ehr-patient',
      'context-ehr-encounter',
      'context-standalone-patient',
      'sso-openid-connect',
      'permission-offline',
      'permission-online',
      'permission-patient',
      'permission-user',
      'permission-v1',
      'permission-v2',
    ],
    code_challenge_methods_supported: ['S256'],
  };
}

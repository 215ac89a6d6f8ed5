import path from 'node:path';
import { databaseIdentity, type Config } from '../config/config.ts';
import type { SqlDriver } from '../store/sql-driver.ts';
import { normalizeHost } from './address-policy.ts';
import {
  classAllowedNow,
  classRefusal,
  destinationIndex,
  isPhiClass,
  type BaaState,
  type DataClass,
  type EndpointProtocol,
  type Vendor,
} from './vendor-registry.ts';

/**
 * The PHI flow map (issue 7, docs/phi-boundary.md, "PHI flow map"): from the running configuration,
 * the vendor registry and the projects' BAAs, every place PHI enters (the FHIR REST API), rests (the
 * resource store, the audit store, the key provider; backups when configured) and leaves (each
 * registered vendor and each infrastructure destination), each flow marked covered or not, with the
 * reason. It describes flows, never data: no resource content, no credentials (database URLs are
 * reduced to host, port and database name).
 *
 * The egress allowlist in it is built by `destinationIndex`, the function the egress gateway looks
 * destinations up in, over the same vendors, and a vendor flow is covered exactly when
 * `classRefusal` (the gateway's class and BAA rule) lets through the class the vendor is registered
 * for. So the map cannot show a destination the gateway refuses, nor miss one it allows.
 *
 * @example
 * const map = await collectFlowMap({ config, vendors: registry, db: resourceDb });
 * process.stdout.write(flowMapMermaid(map));
 * process.exitCode = map.covered ? 0 : 1;
 */

/** The part of the configuration the map reads. */
export type FlowConfig = Pick<
  Config,
  | 'env'
  | 'dataDir'
  | 'databaseUrl'
  | 'auditDatabaseUrl'
  | 'host'
  | 'port'
  | 'publicUrl'
  | 'tls'
  | 'trustedProxies'
  | 'keyProvider'
  | 'keyringPassphrase'
  | 'encryption'
  | 'pkcs11'
  | 'kms'
  | 'smtp'
>;

/** A project as the map needs it: its kind and what its BAAs cover. */
export interface FlowProject {
  projectId: string;
  name: string;
  kind: 'sandbox' | 'production';
  baas: { counterparty: string; services: string[] }[];
}

/** Active subscriptions of one project, channel and destination (the endpoint, or the SMTP relay). */
export interface SubscriptionFlow {
  projectId: string;
  channel: 'rest-hook' | 'email';
  host: string;
  port: number;
  count: number;
  /** How many of them carry PHI (id-only or full-resource; empty notifications carry none). */
  phi: number;
}

/** The project BAA service that covers each notification channel (project-baa.ts BAA_SERVICES). */
export const CHANNEL_SERVICE: Readonly<Record<SubscriptionFlow['channel'], string>> = {
  'rest-hook': 'subscriptions',
  email: 'email',
};

export interface FlowMapInput {
  config: FlowConfig;
  /** Registered vendors and infrastructure destinations (`VendorRegistry.list()`). */
  vendors: readonly Vendor[];
  projects: readonly FlowProject[];
  /** The running server's active subscriptions; undefined when not known (no server running). */
  subscriptions?: readonly SubscriptionFlow[];
  now?: Date;
}

export type FlowDirection = 'enters' | 'rests' | 'leaves';

export interface FlowNode {
  /** Unique, `[a-z0-9_]` only (a Mermaid and Graphviz identifier). */
  id: string;
  kind: 'custos' | 'ingress' | 'store' | 'key-provider' | 'vendor' | 'infrastructure';
  label: string;
  /** Where it is and what it is, one line each (no credentials). */
  details: string[];
  /** Vendors and infrastructure destinations. */
  vendor?: {
    vendorId: string;
    phiClass: DataClass;
    baaState: BaaState;
    baaExpiresOn?: string;
    expiresInDays?: number;
    services: string[];
    configuredBy?: string;
    endpoints: { host: string; port: number; protocol: EndpointProtocol; allowPrivate: boolean }[];
  };
}

export interface Flow {
  id: string;
  direction: FlowDirection;
  from: string;
  to: string;
  /** The most sensitive class the flow may carry. */
  dataClass: DataClass;
  /** Only sandbox projects exist: what enters and rests is test data (HTEST), not PHI. */
  testDataOnly?: boolean;
  covered: boolean;
  /** Why it is not covered (empty when covered). */
  reasons: string[];
  /** Warnings that do not uncover it (a BAA expiring within 30 days). */
  notes: string[];
}

/** One line of the egress allowlist: a destination the gateway may connect to. */
export interface AllowlistEntry {
  host: string;
  port: number;
  protocol: EndpointProtocol;
  vendorId: string;
  vendor: string;
  kind: Vendor['kind'];
  /** The class the vendor is registered for. */
  dataClass: DataClass;
  /** The most the gateway sends there today (less than `dataClass` without an active BAA). */
  allowedNow: DataClass;
  /** Private, loopback or link-local addresses allowed for this endpoint. */
  allowPrivate: boolean;
}

export interface FlowMap {
  generatedAt: string;
  environment: FlowConfig['env'];
  /** Every flow is covered. */
  covered: boolean;
  nodes: FlowNode[];
  flows: Flow[];
  allowlist: AllowlistEntry[];
  projects: {
    projectId: string;
    name: string;
    kind: 'sandbox' | 'production';
    counterparties: string[];
    services: string[];
  }[];
  /** Places on the issue's list that this configuration (or this version) does not have. */
  notConfigured: string[];
  /** Every uncovered flow's reason, then the other warnings. */
  warnings: string[];
}

/** Services of a project BAA (project-baa.ts) that put PHI into the resource store. */
const STORE_SERVICES = ['fhir', 'mllp', 'imports'];

/** What a URL shows on the map: scheme, host, port and path; never user or password. */
function safeUrl(url: string): string {
  const u = new URL(url);
  u.username = '';
  u.password = '';
  u.search = '';
  u.hash = '';
  return u.href.replace(/\/$/, '');
}

function postgresLocation(url: string): string {
  return `PostgreSQL ${databaseIdentity(url)}`;
}

function serverOf(url: string): string {
  return databaseIdentity(url).replace(/\/.*$/, '');
}

function hostPort(host: string, port: number): string {
  return `${host.includes(':') ? `[${host}]` : host}:${port}`;
}

function nodeId(prefix: string, id: string): string {
  return `${prefix}_${id.toLowerCase().replace(/[^a-z0-9]+/g, '_')}`.replace(/_+$/, '');
}

function classText(c: DataClass, testDataOnly?: boolean): string {
  if (testDataOnly) return 'test data only';
  return { full: 'full PHI', limited: 'limited data set', deidentified: 'de-identified', none: 'no PHI' }[c];
}

/** Builds the map (no I/O). */
export function buildFlowMap(input: FlowMapInput): FlowMap {
  const { config } = input;
  const now = input.now ?? new Date();
  const production = input.projects.filter((p) => p.kind === 'production');
  const testDataOnly = production.length === 0;
  const restClass: DataClass = testDataOnly ? 'none' : 'full';
  const servicesOf = (p: FlowProject) => [...new Set(p.baas.flatMap((b) => b.services))];
  const projectName = (p: FlowProject) => `${p.projectId} ("${p.name}")`;
  /** Production projects whose BAAs cover none of `services`, as reasons. */
  const missing = (services: string[], what: string): string[] =>
    production
      .filter((p) => !servicesOf(p).some((s) => services.includes(s)))
      .map(
        (p) =>
          `production project ${projectName(p)}: ${what}, but no BAA of the project covers ${services.join(' or ')}`,
      );

  const nodes: FlowNode[] = [];
  const flows: Flow[] = [];
  const warnings: string[] = [];
  const flow = (f: Omit<Flow, 'id' | 'covered' | 'notes'> & { notes?: string[] }) =>
    flows.push({ ...f, id: `${f.from}__${f.to}`, covered: f.reasons.length === 0, notes: f.notes ?? [] });

  nodes.push({
    id: 'custos',
    kind: 'custos',
    label: 'Custos',
    details: [`this installation (CUSTOS_ENV=${config.env})`],
  });

  // Where PHI enters. MLLP and bulk imports are not built in this version: they are not on the map.
  const transport = config.tls
    ? 'TLS 1.2+ at the listener (CUSTOS_TLS_CERT)'
    : config.trustedProxies.length > 0
      ? 'TLS terminated by a trusted proxy (CUSTOS_TRUSTED_PROXIES)'
      : 'plain HTTP (development only)';
  nodes.push({
    id: 'ingress_fhir',
    kind: 'ingress',
    label: 'FHIR REST API',
    details: [
      `${safeUrl(config.publicUrl)}/fhir/R4`,
      `listener ${config.tls ? 'https' : 'http'}://${hostPort(config.host, config.port)}; ${transport}`,
      'same listener: OAuth/SMART and the admin API',
    ],
  });
  flow({
    direction: 'enters',
    from: 'ingress_fhir',
    to: 'custos',
    dataClass: restClass,
    testDataOnly,
    reasons: missing(['fhir'], 'PHI enters through the FHIR REST API'),
  });

  // Where PHI rests.
  nodes.push({
    id: 'store_resources',
    kind: 'store',
    label: 'resource store',
    details: [
      config.databaseUrl
        ? postgresLocation(config.databaseUrl)
        : `embedded PGlite, ${path.join(config.dataDir, 'resources')}`,
      config.encryption
        ? 'protected elements encrypted per field'
        : 'field encryption off (CUSTOS_ENCRYPTION=off)',
    ],
  });
  flow({
    direction: 'rests',
    from: 'custos',
    to: 'store_resources',
    dataClass: restClass,
    testDataOnly,
    reasons: missing(STORE_SERVICES, 'its PHI rests in the resource store'),
  });
  const auditSeparate =
    config.databaseUrl && config.auditDatabaseUrl
      ? serverOf(config.databaseUrl) === serverOf(config.auditDatabaseUrl)
        ? 'a separate database on the same server as the resource store'
        : 'a separate database server'
      : config.auditDatabaseUrl
        ? 'a separate database server (resources are embedded)'
        : 'a separate embedded database';
  nodes.push({
    id: 'store_audit',
    kind: 'store',
    label: 'audit store',
    details: [
      config.auditDatabaseUrl
        ? postgresLocation(config.auditDatabaseUrl)
        : `embedded PGlite, ${path.join(config.dataDir, 'audit')}`,
      `${auditSeparate}; append-only, PHI-bearing fields sealed`,
    ],
  });
  flow({
    direction: 'rests',
    from: 'custos',
    to: 'store_audit',
    dataClass: restClass,
    testDataOnly,
    reasons: missing(['audit'], 'its audit events (sealed PHI fields) rest in the audit store'),
  });

  // The key provider: keys, not PHI. An AWS KMS is also an infrastructure destination (below).
  if (config.encryption && config.keyProvider !== 'aws-kms') {
    const details =
      config.keyProvider === 'pkcs11' && config.pkcs11
        ? [`PKCS#11 module ${config.pkcs11.module}`, `token ${config.pkcs11.tokenLabel}`]
        : [
            `local keyring ${path.join(config.dataDir, 'keys', 'keyring.json')}`,
            config.keyringPassphrase === undefined
              ? 'generated development passphrase (development only)'
              : 'passphrase from CUSTOS_KEYRING_PASSPHRASE',
          ];
    nodes.push({ id: 'key_provider', kind: 'key-provider', label: 'key provider', details });
    flow({ direction: 'rests', from: 'custos', to: 'key_provider', dataClass: 'none', reasons: [] });
    if (!testDataOnly && config.keyProvider === 'local' && config.keyringPassphrase === undefined)
      warnings.push(
        'production projects exist, but their keys are under the generated development keyring passphrase',
      );
  }

  // Where PHI leaves: each vendor and infrastructure destination, its class decided by the gateway's rule.
  for (const v of input.vendors) {
    if (v.kind === 'self') continue; // the CLI's own calls; not a destination of the server
    const id =
      v.kind === 'vendor' ? nodeId('vendor', v.vendorId) : nodeId('infra', v.vendorId.replace(/^infra-/, ''));
    const kms = v.vendorId === 'infra-kms';
    const baaText =
      v.kind !== 'vendor'
        ? `configured by ${v.configuredBy ?? 'the environment'}`
        : v.baaState === 'none'
          ? 'no BAA'
          : v.baaState === 'not-executed'
            ? 'BAA not executed'
            : `BAA executed ${v.baa?.executedAt}, expires ${v.baa?.expiresOn} (${v.baaState})`;
    const endpoints = v.endpoints.map((e) => ({
      host: e.host,
      port: e.port,
      protocol: e.protocol,
      allowPrivate: e.allowPrivate,
    }));
    nodes.push({
      id,
      kind: v.kind === 'vendor' ? 'vendor' : kms ? 'key-provider' : 'infrastructure',
      label: v.name,
      details: [
        ...(kms && config.kms
          ? [`AWS KMS, region ${config.kms.region}`, ...(config.encryption ? [] : ['field encryption off'])]
          : []),
        `may receive: ${classText(v.phiClass)}; ${baaText}`,
        ...(endpoints.length
          ? endpoints.map(
              (e) =>
                `${e.protocol}://${hostPort(e.host, e.port)}${e.allowPrivate ? ' (private address allowed)' : ''}`,
            )
          : ['no endpoint: nothing can be sent to it']),
      ],
      vendor: {
        vendorId: v.vendorId,
        phiClass: v.phiClass,
        baaState: v.baaState,
        ...(v.baa?.expiresOn ? { baaExpiresOn: v.baa.expiresOn } : {}),
        ...(v.expiresInDays !== undefined ? { expiresInDays: v.expiresInDays } : {}),
        services: v.services,
        ...(v.configuredBy ? { configuredBy: v.configuredBy } : {}),
        endpoints,
      },
    });
    if (endpoints.length === 0) continue;
    const subs = subscriptionsTo(v, input.subscriptions ?? []);
    if (subs.length > 0) nodes.at(-1)!.details.push(...subscriptionDetails(subs, input.projects));
    const refused = classRefusal(v, v.phiClass);
    const reasons: string[] =
      refused === 'EGRESS_BAA_EXPIRED'
        ? [
            `${v.name} may receive ${classText(v.phiClass)}, but its BAA expired on ${v.baa?.expiresOn}: the gateway blocks PHI to it`,
          ]
        : refused
          ? [
              `${v.name} may receive ${classText(v.phiClass)} without an executed BAA (${v.baaState === 'none' ? 'none recorded' : 'not executed'}): the gateway blocks PHI to it`,
            ]
          : [];
    // Notifications of a production project's data need its BAA to cover the channel's service.
    for (const sub of subs) {
      const p = production.find((x) => x.projectId === sub.projectId);
      const service = CHANNEL_SERVICE[sub.channel];
      if (p && sub.phi > 0 && !servicesOf(p).includes(service))
        reasons.push(
          `production project ${projectName(p)}: ${sub.phi} active ${sub.channel} subscription(s) send PHI to ${v.name}, but no BAA of the project covers ${service}`,
        );
    }
    const notes =
      v.baaState === 'expiring' && isPhiClass(v.phiClass)
        ? [`the BAA of ${v.name} expires on ${v.baa?.expiresOn} (in ${v.expiresInDays} days)`]
        : [];
    const plain = endpoints.filter((e) => e.protocol === 'http');
    if (plain.length > 0)
      notes.push(
        `${v.name}: plain http to ${plain.map((e) => hostPort(e.host, e.port)).join(', ')} (private addresses only; for tests)`,
      );
    flow({ direction: 'leaves', from: 'custos', to: id, dataClass: v.phiClass, reasons, notes });
  }

  // The SMTP relay of e-mail notifications is a vendor like any other; configured but not
  // registered (host, port, protocol tls), every e-mail is refused: a red flow says so.
  if (config.smtp) {
    const { host, port } = config.smtp;
    const relayHost = normalizeHost(host) ?? host;
    const registered = [...destinationIndex(input.vendors).values()].some(
      (d) => d.kind === 'vendor' && d.protocol === 'tls' && d.host === relayHost && d.port === port,
    );
    if (!registered) {
      nodes.push({
        id: 'vendor_smtp_relay',
        kind: 'vendor',
        label: 'SMTP relay (CUSTOS_SMTP_URL)',
        details: [`tls://${hostPort(host, port)}`, 'e-mail notifications of subscriptions'],
      });
      flow({
        direction: 'leaves',
        from: 'custos',
        to: 'vendor_smtp_relay',
        dataClass: 'full',
        reasons: [
          `CUSTOS_SMTP_URL names ${hostPort(host, port)}, which is not a registered vendor endpoint with protocol tls: the gateway refuses every e-mail to it`,
        ],
      });
    }
  }

  // The allowlist: the gateway's own index of destinations over the same vendors.
  const allowlist: AllowlistEntry[] = [...destinationIndex(input.vendors).values()]
    .filter((d) => d.kind !== 'self')
    .map((d) => ({
      host: d.host,
      port: d.port,
      protocol: d.protocol,
      vendorId: d.vendorId,
      vendor: d.vendorName,
      kind: d.kind,
      dataClass: d.phiClass,
      allowedNow: classAllowedNow(d),
      allowPrivate: d.allowPrivate,
    }))
    .sort((a, b) => (a.host === b.host ? a.port - b.port : a.host < b.host ? -1 : 1));

  if (input.subscriptions === undefined)
    warnings.push(
      'active subscriptions are known to the running server only: run custos flows while it runs to see which vendors they send to',
    );
  const notConfigured = [
    'MLLP (HL7v2) ingress: not in this version of Custos',
    'bulk imports: not in this version of Custos',
    'backups: none configured (Custos makes none; copies of the databases made outside it are not on this map)',
  ];
  return {
    generatedAt: now.toISOString(),
    environment: config.env,
    covered: flows.every((f) => f.covered),
    nodes,
    flows,
    allowlist,
    projects: input.projects.map((p) => ({
      projectId: p.projectId,
      name: p.name,
      kind: p.kind,
      counterparties: [...new Set(p.baas.map((b) => b.counterparty))],
      services: servicesOf(p),
    })),
    notConfigured,
    warnings: [...flows.flatMap((f) => [...f.reasons, ...f.notes]), ...warnings],
  };
}

/** The subscription flows whose destination is one of the vendor's endpoints. */
function subscriptionsTo(v: Vendor, subs: readonly SubscriptionFlow[]): SubscriptionFlow[] {
  return subs.filter((s) => v.endpoints.some((e) => e.host === s.host && e.port === s.port));
}

function subscriptionDetails(subs: SubscriptionFlow[], projects: readonly FlowProject[]): string[] {
  const name = (id: string) => projects.find((p) => p.projectId === id)?.name ?? id;
  return subs.map(
    (s) =>
      `${s.count} active ${s.channel} subscription(s) of project ${s.projectId} ("${name(s.projectId)}")`,
  );
}

/** Reads the projects and their BAAs' services (resource database, migration 7). */
export async function readFlowProjects(db: SqlDriver): Promise<FlowProject[]> {
  const p = await db.query<{ id: string; name: string; kind: 'sandbox' | 'production' }>(
    'SELECT id, name, kind FROM project ORDER BY name, id',
  );
  const b = await db.query<{ project_id: string; counterparty: string; services: string[] }>(
    'SELECT project_id, counterparty, services FROM project_baa ORDER BY recorded_at, id',
  );
  return p.rows.map((r) => ({
    projectId: r.id,
    name: r.name,
    kind: r.kind,
    baas: b.rows
      .filter((x) => x.project_id === r.id)
      .map((x) => ({ counterparty: x.counterparty, services: x.services })),
  }));
}

/** The map of a running configuration: its vendors (registry) and its projects (database). */
export async function collectFlowMap(sources: {
  config: FlowConfig;
  vendors: { list(): Promise<Vendor[]> };
  db: SqlDriver;
  /** The running server's active subscriptions (its worker); undefined when not known. */
  subscriptions?: () => readonly SubscriptionFlow[] | undefined;
  now?: () => Date;
}): Promise<FlowMap> {
  const vendors = await sources.vendors.list();
  const projects = await readFlowProjects(sources.db);
  return buildFlowMap({
    config: sources.config,
    vendors,
    projects,
    subscriptions: sources.subscriptions?.(),
    now: sources.now?.(),
  });
}

// --- renderings --------------------------------------------------------------------------------

function flowLabel(f: Flow): string {
  return `${classText(f.dataClass, f.testDataOnly)}${f.covered ? '' : ': NOT COVERED'}`;
}

/** Human text: enters, rests, leaves, what is not configured, warnings. */
export function flowMapText(map: FlowMap): string {
  const byId = new Map(map.nodes.map((n) => [n.id, n]));
  const line = (f: Flow) => {
    const n = byId.get(f.direction === 'enters' ? f.from : f.to)!;
    const mark = f.covered ? 'ok' : 'NOT COVERED';
    return [
      `  [${mark}] ${n.label}: ${flowLabel(f).replace(/: NOT COVERED$/, '')}`,
      ...n.details.map((d) => `      ${d}`),
      ...f.reasons.map((r) => `      not covered: ${r}`),
      ...f.notes.map((r) => `      warning: ${r}`),
    ].join('\n');
  };
  const section = (title: string, d: FlowDirection, extra: string[] = []) => {
    const fs = map.flows.filter((f) => f.direction === d);
    return [title, ...fs.map(line), ...extra].join('\n');
  };
  const production = map.projects.filter((p) => p.kind === 'production');
  const idle = map.nodes.filter(
    (n) => (n.kind === 'vendor' || n.kind === 'infrastructure') && !map.flows.some((f) => f.to === n.id),
  );
  const uncovered = map.flows.filter((f) => !f.covered).length;
  return [
    `PHI flow map (CUSTOS_ENV=${map.environment}, generated ${map.generatedAt})`,
    `projects: ${production.length} production, ${map.projects.length - production.length} sandbox` +
      (production.length === 0 ? ' (test data only: no PHI)' : ''),
    ...production.map(
      (p) =>
        `  ${p.projectId} ("${p.name}"): BAA with ${p.counterparties.join(', ') || 'nobody'}; covers ${p.services.join(', ') || 'nothing'}`,
    ),
    '',
    section('Where PHI enters', 'enters'),
    '',
    section('Where PHI rests', 'rests', [
      ...(map.nodes.some((n) => n.id === 'key_provider')
        ? []
        : [
            map.nodes.some((n) => n.id === 'infra_kms')
              ? '  key provider: AWS KMS (under "Where PHI leaves")'
              : '  key provider: none (field encryption off)',
          ]),
      '  backups: none configured',
    ]),
    '',
    section(
      'Where PHI leaves',
      'leaves',
      idle.map((n) => `  [-] ${n.label}: no endpoint, nothing can be sent to it`),
    ),
    ...(map.flows.some((f) => f.direction === 'leaves')
      ? []
      : ['  nothing: no vendor or infrastructure destination with an endpoint']),
    '',
    'Not on the map',
    ...map.notConfigured.map((s) => `  ${s}`),
    ...(map.warnings.length ? ['', 'Warnings', ...map.warnings.map((w) => `  WARNING: ${w}`)] : []),
    '',
    `${map.flows.length} flow(s), ${uncovered === 0 ? 'all covered' : `${uncovered} NOT COVERED`}; ` +
      `${map.allowlist.length} egress destination(s) (custos flows --allowlist)`,
  ].join('\n');
}

/** Which part of a drawing a node goes in. */
function groupOf(n: FlowNode): FlowDirection | undefined {
  if (n.kind === 'custos') return undefined;
  if (n.vendor) return 'leaves';
  return n.kind === 'ingress' ? 'enters' : 'rests';
}

const GROUPS: [FlowDirection, string][] = [
  ['enters', 'Where PHI enters'],
  ['rests', 'Where PHI rests'],
  ['leaves', 'Where PHI leaves'],
];

function mermaidText(s: string): string {
  return s.replace(/#/g, '#35;').replace(/"/g, '#quot;').replace(/</g, '#lt;').replace(/>/g, '#gt;');
}

function mermaidNode(n: FlowNode): string {
  const label = [n.label, ...n.details].map(mermaidText).join('<br/>');
  switch (n.kind) {
    case 'custos':
      return `${n.id}[["${label}"]]`;
    case 'ingress':
      return `${n.id}(["${label}"])`;
    case 'store':
      return `${n.id}[("${label}")]`;
    case 'key-provider':
      return `${n.id}{{"${label}"}}`;
    default:
      return `${n.id}["${label}"]`;
  }
}

/** A Mermaid `flowchart LR`; uncovered flows and their nodes in red. */
export function flowMapMermaid(map: FlowMap): string {
  const out = ['flowchart LR', `  %% Custos PHI flow map, CUSTOS_ENV=${map.environment}, ${map.generatedAt}`];
  out.push(`  ${mermaidNode(map.nodes.find((n) => n.kind === 'custos')!)}`);
  for (const [id, title] of GROUPS) {
    const ns = map.nodes.filter((n) => groupOf(n) === id);
    if (ns.length === 0) continue;
    out.push(`  subgraph ${id}["${title}"]`, ...ns.map((n) => `    ${mermaidNode(n)}`), '  end');
  }
  map.flows.forEach((f) => out.push(`  ${f.from} -->|"${mermaidText(flowLabel(f))}"| ${f.to}`));
  out.push('  classDef uncovered fill:#fdd,stroke:#d00,color:#900');
  const red = map.flows.map((f, i) => [f, i] as const).filter(([f]) => !f.covered);
  for (const [, i] of red) out.push(`  linkStyle ${i} stroke:#d00,stroke-width:2px,color:#d00`);
  const redNodes = [...new Set(red.map(([f]) => (f.direction === 'enters' ? f.from : f.to)))];
  if (redNodes.length) out.push(`  class ${redNodes.join(',')} uncovered`);
  for (const s of map.notConfigured) out.push(`  %% not on the map: ${s.replace(/\n/g, ' ')}`);
  return `${out.join('\n')}\n`;
}

function dotText(s: string): string {
  return s.replace(/\\/g, '\\\\').replace(/"/g, '\\"');
}

/** A Graphviz digraph; uncovered flows and their nodes `color=red`. */
export function flowMapDot(map: FlowMap): string {
  const red = new Set(
    map.flows.filter((f) => !f.covered).map((f) => (f.direction === 'enters' ? f.from : f.to)),
  );
  const shape: Record<FlowNode['kind'], string> = {
    custos: 'box3d',
    ingress: 'cds',
    store: 'cylinder',
    'key-provider': 'hexagon',
    vendor: 'box',
    infrastructure: 'box',
  };
  const node = (n: FlowNode) =>
    `"${n.id}" [label="${[n.label, ...n.details].map(dotText).join('\\n')}", shape=${shape[n.kind]}` +
    `${red.has(n.id) ? ', color=red, fontcolor=red' : ''}];`;
  const out = [
    'digraph custos_phi_flows {',
    '  rankdir=LR;',
    `  label="Custos PHI flow map, CUSTOS_ENV=${map.environment}, ${map.generatedAt}";`,
    '  node [fontsize=10];',
    ...map.nodes.filter((n) => n.kind === 'custos').map((n) => `  ${node(n)}`),
  ];
  for (const [id, title] of GROUPS) {
    const ns = map.nodes.filter((n) => groupOf(n) === id);
    if (ns.length === 0) continue;
    out.push(
      `  subgraph cluster_${id} {`,
      `    label="${title}";`,
      ...ns.map((n) => `    ${node(n)}`),
      '  }',
    );
  }
  for (const f of map.flows)
    out.push(
      `  "${f.from}" -> "${f.to}" [label="${dotText(flowLabel(f))}"` +
        `${f.covered ? '' : ', color=red, fontcolor=red, penwidth=2'}];`,
    );
  out.push('}');
  return `${out.join('\n')}\n`;
}

/** The egress allowlist as text: a comment header, then `host port protocol vendor class allowed-now`. */
export function allowlistText(map: FlowMap): string {
  const rows = map.allowlist.map((e) =>
    [e.host, String(e.port), e.protocol, `${e.vendor} (${e.vendorId})`, e.dataClass, e.allowedNow].join('\t'),
  );
  return [
    `# Custos egress allowlist (${map.generatedAt}): every destination the egress gateway may connect to;`,
    '# anything else is refused by Custos and may be blocked by a firewall. Columns, tab-separated:',
    '# host\tport\tprotocol\tvendor\tregistered class\tclass allowed now',
    ...rows,
  ].join('\n');
}

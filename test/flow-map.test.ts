import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { spawn } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import path from 'node:path';
import Fastify from 'fastify';
import { PgliteDriver } from '../src/store/pglite/pglite-driver.ts';
import { PgDriver } from '../src/store/pg/pg-driver.ts';
import type { SqlDriver } from '../src/store/sql-driver.ts';
import { migrate, RESOURCE_MIGRATIONS } from '../src/store/migrations.ts';
import { prepareAuditSchema } from '../src/audit/audit-migrations.ts';
import { AuditLog } from '../src/audit/audit-log.ts';
import { loadConfig, type Config } from '../src/config/config.ts';
import { classWithin, DATA_CLASSES, VendorRegistry, type Vendor } from '../src/egress/vendor-registry.ts';
import { EgressGateway } from '../src/egress/egress.ts';
import { infrastructureVendors } from '../src/egress/infrastructure.ts';
import {
  allowlistText,
  buildFlowMap,
  collectFlowMap,
  flowMapDot,
  flowMapMermaid,
  flowMapText,
  type FlowMap,
} from '../src/egress/flow-map.ts';
import { createProject, recordProjectBaa } from '../src/admin/project-baa.ts';
import { registerFlowRoutes } from '../src/admin/flow-routes.ts';
import { CustosError, isCustosError } from '../src/kernel/errors.ts';
import { createTestStorage, type TestStorage } from './support/storage.ts';
import { runCustos } from './support/custos-cli.ts';
import { freePort } from './support/harness.ts';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');

// The PHI flow map (issue 7): from a real configuration, a real vendor registry and real projects,
// where PHI enters, rests and leaves, each flow covered or not; its allowlist is the gateway's.
// On embedded storage or, with CUSTOS_TEST_DATABASE_URL, a PostgreSQL server.

const SHA = 'b'.repeat(64);
const day = (offset: number) => new Date(Date.now() + offset * 86_400_000).toISOString().slice(0, 10);

/** Credentials planted in the configuration: none may appear in any output. */
const SECRETS = ['s3cret-pw', 'qs-secret', 'au-secret', 'kms-secret-key', 'AKIAFLOWMAPTEST', 'pub-pw'];

/** A production-like configuration with every destination kind, and passwords in its URLs. */
function plantedConfig(dataDir: string): Config {
  const vkey = `witness.example.com+0a1b2c3d+${Buffer.concat([Buffer.from([4]), randomBytes(32)]).toString('base64')}`;
  return loadConfig(
    {
      CUSTOS_DATA_DIR: dataDir,
      CUSTOS_DATABASE_URL: 'postgres://custos:s3cret-pw@db.internal:5432/custos?password=qs-secret',
      CUSTOS_AUDIT_DATABASE_URL: 'postgresql://auditor:au-secret@audit-db.internal:6432/custos_audit',
      CUSTOS_PUBLIC_URL: 'https://admin:pub-pw@fhir.example.org',
      CUSTOS_KEY_PROVIDER: 'aws-kms',
      CUSTOS_KMS_REGION: 'eu-west-1',
      CUSTOS_KMS_ACCESS_KEY_ID: 'AKIAFLOWMAPTEST',
      CUSTOS_KMS_SECRET_ACCESS_KEY: 'kms-secret-key',
      CUSTOS_SIEM_URL: 'syslog-tls://siem.example.test:6514',
      CUSTOS_AUDIT_WITNESSES: `${vkey}=https://witness.example.com/w`,
    },
    dataDir,
  );
}

/** Every line of a Mermaid flowchart, parsed: nodes, edges, link styles, classes. */
function parseMermaid(text: string) {
  const lines = text.trimEnd().split('\n');
  assert.equal(lines[0], 'flowchart LR');
  const nodes = new Set<string>();
  const edges: { from: string; to: string; label: string }[] = [];
  const linkStyles = new Map<number, string>();
  const classes = new Map<string, string[]>();
  let depth = 0;
  for (const raw of lines.slice(1)) {
    const line = raw.trim();
    let m: RegExpExecArray | null;
    if (line.startsWith('%%')) continue;
    if (/^subgraph (\w+)\["[^"]*"\]$/.test(line)) depth++;
    else if (line === 'end') depth--;
    else if ((m = /^(\w+)(\[\[|\(\[|\[\(|\{\{|\[)"([^"]*)"(\]\]|\]\)|\)\]|\}\}|\])$/.exec(line))) {
      const close = { '[[': ']]', '([': '])', '[(': ')]', '{{': '}}', '[': ']' }[m[2]!];
      assert.equal(m[4], close, `shape of ${m[1]} closes as it opens`);
      assert.ok(!nodes.has(m[1]!), `${m[1]} declared once`);
      nodes.add(m[1]!);
    } else if ((m = /^(\w+) -->\|"([^"]*)"\| (\w+)$/.exec(line)))
      edges.push({ from: m[1]!, to: m[3]!, label: m[2]! });
    else if ((m = /^linkStyle (\d+) (\S+)$/.exec(line))) linkStyles.set(Number(m[1]), m[2]!);
    else if ((m = /^classDef (\w+) (\S+)$/.exec(line))) classes.set(`def:${m[1]}`, [m[2]!]);
    else if ((m = /^class ([\w,]+) (\w+)$/.exec(line))) classes.set(m[2]!, m[1]!.split(','));
    else assert.fail(`unexpected Mermaid line: ${line}`);
    assert.ok(depth >= 0 && depth <= 1, 'subgraphs balanced');
  }
  assert.equal(depth, 0, 'every subgraph ends');
  return { nodes, edges, linkStyles, classes };
}

/** Every line of the Graphviz digraph, parsed. */
function parseDot(text: string) {
  const lines = text.trimEnd().split('\n');
  assert.equal(lines[0], 'digraph custos_phi_flows {');
  assert.equal(lines.at(-1), '}');
  const str = '"((?:[^"\\\\]|\\\\.)*)"';
  const nodes = new Map<string, boolean>();
  const edges: { from: string; to: string; red: boolean }[] = [];
  let depth = 1;
  for (const raw of lines.slice(1, -1)) {
    const line = raw.trim();
    let m: RegExpExecArray | null;
    if (/^(rankdir=LR|node \[fontsize=10\]);$/.test(line) || new RegExp(`^label=${str};$`).test(line))
      continue;
    if (/^subgraph cluster_\w+ \{$/.test(line)) depth++;
    else if (line === '}') depth--;
    else if (
      (m = new RegExp(`^"(\\w+)" \\[label=${str}, shape=\\w+(, color=red, fontcolor=red)?\\];$`).exec(line))
    )
      nodes.set(m[1]!, m[3] !== undefined);
    else if (
      (m = new RegExp(
        `^"(\\w+)" -> "(\\w+)" \\[label=${str}(, color=red, fontcolor=red, penwidth=2)?\\];$`,
      ).exec(line))
    )
      edges.push({ from: m[1]!, to: m[2]!, red: m[4] !== undefined });
    else assert.fail(`unexpected DOT line: ${line}`);
    assert.ok(depth >= 1, 'braces balanced');
  }
  assert.equal(depth, 1, 'every cluster closes');
  return { nodes, edges };
}

/** Checks a map's drawings: every referenced node declared, exactly the uncovered flows red. */
function checkDrawings(map: FlowMap): void {
  const mm = parseMermaid(flowMapMermaid(map));
  assert.equal(mm.edges.length, map.flows.length);
  for (const e of mm.edges) assert.ok(mm.nodes.has(e.from) && mm.nodes.has(e.to), `${e.from} -> ${e.to}`);
  const uncovered = map.flows.flatMap((f, i) => (f.covered ? [] : [i]));
  assert.deepEqual([...mm.linkStyles.keys()], uncovered, 'the uncovered edges, and only those, styled');
  for (const s of mm.linkStyles.values()) assert.match(s, /stroke:#d00/);
  for (const i of uncovered) assert.match(mm.edges[i]!.label, /NOT COVERED/);
  for (const id of mm.classes.get('uncovered') ?? []) assert.ok(mm.nodes.has(id), `class on declared ${id}`);
  const dot = parseDot(flowMapDot(map));
  for (const e of dot.edges) assert.ok(dot.nodes.has(e.from) && dot.nodes.has(e.to), `${e.from} -> ${e.to}`);
  assert.deepEqual(
    dot.edges.map((e) => e.red),
    map.flows.map((f) => !f.covered),
    'red edges are the uncovered flows',
  );
  assert.deepEqual(
    new Set([...mm.nodes]),
    new Set(map.nodes.map((n) => n.id)),
    'Mermaid declares every node of the map',
  );
  assert.deepEqual(new Set(dot.nodes.keys()), new Set(map.nodes.map((n) => n.id)));
}

function allOutputs(map: FlowMap): string {
  return [
    flowMapText(map),
    JSON.stringify(map),
    flowMapMermaid(map),
    flowMapDot(map),
    allowlistText(map),
  ].join('\n');
}

describe('PHI flow map', () => {
  let storage: TestStorage;
  let resourceDb: SqlDriver;
  let auditDb: SqlDriver;
  let audit: AuditLog;
  let registry: VendorRegistry;
  let config: Config;
  const map = () => collectFlowMap({ config, vendors: registry, db: resourceDb });

  before(async () => {
    storage = await createTestStorage();
    resourceDb = storage.databaseUrl
      ? await PgDriver.open(storage.databaseUrl)
      : await PgliteDriver.open(path.join(storage.dataDir, 'resources'));
    auditDb = storage.auditDatabaseUrl
      ? await PgDriver.open(storage.auditDatabaseUrl)
      : await PgliteDriver.open(path.join(storage.dataDir, 'audit'));
    await migrate(resourceDb, RESOURCE_MIGRATIONS, 'custos_migration');
    await prepareAuditSchema(auditDb, { production: false });
    audit = new AuditLog(auditDb);
    config = plantedConfig(storage.dataDir);
    registry = new VendorRegistry({ db: resourceDb, audit, infrastructure: infrastructureVendors(config) });
    // A sandbox, and a production project whose BAA covers the FHIR API and the audit log.
    await createProject({ db: resourceDb, audit }, { name: 'Playground' });
    const clinic = await createProject({ db: resourceDb, audit }, { name: 'Clinic', production: true });
    await recordProjectBaa(
      { db: resourceDb, audit },
      {
        projectId: clinic.projectId,
        counterparty: 'Example Clinic LLC',
        signedBy: 'Dana Roe',
        signedAt: day(-30),
        services: ['fhir', 'audit'],
        documentSha256: SHA,
      },
    );
  });

  after(async () => {
    await resourceDb?.close();
    await auditDb?.close();
    await storage?.cleanup();
  });

  test('a vendor with an executed BAA is covered; stores and destinations come from the configuration', async () => {
    const v = await registry.addVendor({ name: 'Covered Hooks', services: ['webhooks'], phiClass: 'full' });
    await registry.addEndpoint({
      vendor: v.vendorId,
      host: 'hooks.example.com',
      port: 443,
      protocol: 'https',
    });
    await registry.recordBaa({
      vendor: v.vendorId,
      executedAt: day(-10),
      expiresOn: day(365),
      documentSha256: SHA,
    });
    const m = await map();
    assert.equal(m.covered, true, m.warnings.join('; '));
    const f = m.flows.find((x) => x.to === `vendor_${v.vendorId.toLowerCase()}`.replace(/[^a-z0-9]+/g, '_'));
    assert.ok(f, 'the vendor has a flow');
    assert.deepEqual([f.direction, f.dataClass, f.covered, f.reasons], ['leaves', 'full', true, []]);
    const node = m.nodes.find((n) => n.id === f.to)!;
    assert.equal(node.vendor?.baaState, 'active');
    const details = (id: string) => m.nodes.find((n) => n.id === id)?.details ?? [];
    assert.deepEqual(
      m.flows.map((x) => [x.direction, x.from, x.to, x.dataClass]),
      [
        ['enters', 'ingress_fhir', 'custos', 'full'],
        ['rests', 'custos', 'store_resources', 'full'],
        ['rests', 'custos', 'store_audit', 'full'],
        ['leaves', 'custos', 'infra_kms', 'none'],
        ['leaves', 'custos', 'infra_siem', 'deidentified'],
        ['leaves', 'custos', 'infra_witness_1', 'none'],
        ['leaves', 'custos', f.to, 'full'],
      ],
    );
    assert.ok(details('ingress_fhir').includes('https://fhir.example.org/fhir/R4'));
    assert.equal(details('store_resources')[0], 'PostgreSQL db.internal:5432/custos');
    assert.equal(details('store_audit')[0], 'PostgreSQL audit-db.internal:6432/custos_audit');
    assert.match(details('store_audit')[1]!, /^a separate database server/);
    assert.ok(details('infra_kms').includes('AWS KMS, region eu-west-1'));
    assert.ok(m.notConfigured.some((s) => s.startsWith('backups: none configured')));
    assert.ok(m.notConfigured.some((s) => s.startsWith('MLLP')));
    assert.deepEqual(
      m.projects.map((p) => [p.name, p.kind, p.services]),
      [
        ['Clinic', 'production', ['fhir', 'audit']],
        ['Playground', 'sandbox', []],
      ],
    );
    checkDrawings(m);
  });

  test('an expired BAA: its flow is red, listed as a warning, and the map is not covered', async () => {
    const v = await registry.addVendor({ name: 'Lapsed "Labs" <LLC> #1', phiClass: 'full' });
    await registry.addEndpoint({
      vendor: v.vendorId,
      host: 'lapsed.example.net',
      port: 8443,
      protocol: 'https',
    });
    await registry.recordBaa({
      vendor: v.vendorId,
      executedAt: day(-400),
      expiresOn: day(-1),
      documentSha256: SHA,
    });
    const m = await map();
    assert.equal(m.covered, false);
    const red = m.flows.filter((f) => !f.covered);
    assert.equal(red.length, 1);
    assert.match(red[0]!.reasons[0]!, /BAA expired on \d{4}-\d{2}-\d{2}: the gateway blocks PHI/);
    assert.ok(m.warnings.includes(red[0]!.reasons[0]!));
    assert.match(flowMapText(m), /\[NOT COVERED\] Lapsed "Labs" <LLC> #1: full PHI/);
    assert.match(flowMapText(m), /WARNING: Lapsed/);
    const entry = m.allowlist.find((e) => e.host === 'lapsed.example.net')!;
    assert.deepEqual([entry.dataClass, entry.allowedNow], ['full', 'deidentified']);
    checkDrawings(m); // the name's quotes and brackets are escaped: every line still parses
    assert.match(flowMapMermaid(m), /class \S*vendor_\w+ uncovered/);
  });

  test('coverage follows what the project BAAs cover; sandbox-only installations carry test data', () => {
    const base = {
      config,
      vendors: [],
      now: new Date(),
    };
    const sandbox = buildFlowMap({
      ...base,
      projects: [{ projectId: 'p1', name: 'Sandbox', kind: 'sandbox', baas: [] }],
    });
    assert.equal(sandbox.covered, true);
    assert.ok(sandbox.flows.filter((f) => f.direction !== 'leaves').every((f) => f.testDataOnly));
    const emailOnly = buildFlowMap({
      ...base,
      projects: [
        {
          projectId: 'p2',
          name: 'Mailer',
          kind: 'production',
          baas: [{ counterparty: 'X', services: ['email'] }],
        },
      ],
    });
    assert.deepEqual(
      emailOnly.flows.filter((f) => !f.covered).map((f) => f.to),
      ['custos', 'store_resources', 'store_audit'],
      'FHIR ingress, resource store and audit store are not covered by an e-mail-only BAA',
    );
    assert.match(emailOnly.warnings[0]!, /project p2 \("Mailer"\).*no BAA of the project covers fhir/);
    checkDrawings(emailOnly);
  });

  test("subscriptions: a vendor's flow is red when a production project's BAA does not cover the channel", () => {
    const hooks: Vendor = {
      vendorId: 'v-hooks',
      name: 'Hooks Inc',
      kind: 'vendor',
      services: ['webhooks', 'email'],
      phiClass: 'full',
      endpoints: [
        { endpointId: 'e1', host: 'hooks.example.org', port: 443, protocol: 'https', allowPrivate: false },
        { endpointId: 'e2', host: 'smtp.example.org', port: 465, protocol: 'tls', allowPrivate: false },
      ],
      baaState: 'active',
      baa: { executedAt: day(-10), expiresOn: day(300), documentSha256: SHA },
    } as unknown as Vendor;
    const project = (services: string[]) => ({
      projectId: 'p3',
      name: 'Clinic',
      kind: 'production' as const,
      baas: [{ counterparty: 'Example Clinic LLC', services: ['fhir', 'audit', ...services] }],
    });
    const subscriptions = [
      {
        projectId: 'p3',
        channel: 'rest-hook' as const,
        host: 'hooks.example.org',
        port: 443,
        count: 2,
        phi: 1,
      },
      { projectId: 'p3', channel: 'email' as const, host: 'smtp.example.org', port: 465, count: 1, phi: 1 },
    ];
    const vendorFlow = (m: ReturnType<typeof buildFlowMap>) =>
      m.flows.find((f) => f.to === 'vendor_v_hooks')!;
    const uncovered = buildFlowMap({ config, vendors: [hooks], projects: [project([])], subscriptions });
    const f = vendorFlow(uncovered);
    assert.equal(f.covered, false);
    assert.deepEqual(
      f.reasons.map((r) => /covers (\w+)$/.exec(r)?.[1]),
      ['subscriptions', 'email'],
      'each channel needs its own BAA service',
    );
    assert.ok(
      uncovered.nodes
        .find((n) => n.id === 'vendor_v_hooks')!
        .details.includes('2 active rest-hook subscription(s) of project p3 ("Clinic")'),
    );
    const webhooksOnly = buildFlowMap({
      config,
      vendors: [hooks],
      projects: [project(['subscriptions'])],
      subscriptions,
    });
    assert.equal(vendorFlow(webhooksOnly).reasons.length, 1);
    const covered = buildFlowMap({
      config,
      vendors: [hooks],
      projects: [project(['subscriptions', 'email'])],
      subscriptions,
    });
    assert.equal(vendorFlow(covered).covered, true);
    // Only notifications carrying PHI need the coverage: empty ones (class none) do not.
    const emptyOnly = buildFlowMap({
      config,
      vendors: [hooks],
      projects: [project([])],
      subscriptions: subscriptions.map((x) => ({ ...x, phi: 0 })),
    });
    assert.equal(vendorFlow(emptyOnly).covered, true);
    // Not known (no server running): said, not guessed.
    const unknown = buildFlowMap({ config, vendors: [hooks], projects: [project([])] });
    assert.equal(vendorFlow(unknown).covered, true);
    assert.ok(unknown.warnings.some((w) => /known to the running server only/.test(w)));
  });

  test('the allowlist is exactly what the gateway lets through, class by class', async () => {
    const m = await map();
    const gateway = new EgressGateway({
      destinations: registry,
      audit,
      // Nothing is resolved, so nothing connects: a request that passes the checks fails here.
      resolve: async () => {
        throw Object.assign(new Error('test: no DNS'), { code: 'ENOTFOUND' });
      },
    });
    const attempt = async (
      protocol: string,
      host: string,
      port: number,
      dataClass: (typeof DATA_CLASSES)[number] = 'none',
    ): Promise<string> => {
      try {
        if (protocol === 'tls')
          (await gateway.connectTls({ purpose: 'flow-map-test', dataClass, host, port })).destroy();
        else
          await gateway.fetch({
            purpose: 'flow-map-test',
            dataClass,
            url: `${protocol}://${host.includes(':') ? `[${host}]` : host}:${port}/`,
          });
        return 'sent';
      } catch (e) {
        return isCustosError(e) ? e.code : 'passed the checks';
      }
    };
    try {
      const listed = new Set(m.allowlist.map((e) => `${e.host}|${e.port}`));
      const probes: [string, string, number][] = [
        ...m.allowlist.map((e) => [e.protocol, e.host, e.port] as [string, string, number]),
        ['https', 'hooks.example.com', 8443], // registered host, other port
        ['https', 'unregistered.example.net', 443],
        ['https', '127.0.0.1', 443],
        ['http', '169.254.169.254', 80],
        ['tls', 'siem.example.test', 6515],
        ['https', 'kms.eu-west-2.amazonaws.com', 443],
        ['https', 'witness.example.com', 8443],
      ];
      for (const [protocol, host, port] of probes) {
        const outcome = await attempt(protocol, host, port);
        assert.equal(
          outcome === 'EGRESS_DESTINATION_UNREGISTERED',
          !listed.has(`${host}|${port}`),
          `${protocol}://${host}:${port}: ${outcome}`,
        );
        if (listed.has(`${host}|${port}`)) assert.equal(outcome, 'passed the checks');
      }
      assert.ok(m.allowlist.length >= 5);
      // The class column: what the gateway's class and BAA checks let through today.
      for (const e of m.allowlist)
        for (const c of DATA_CLASSES) {
          const outcome = await attempt(e.protocol, e.host, e.port, c);
          assert.equal(
            outcome === 'passed the checks',
            classWithin(c, e.allowedNow),
            `${e.vendor} ${c}: ${outcome} (allowed now: ${e.allowedNow})`,
          );
        }
    } finally {
      await gateway.close();
    }
  });

  test('no credentials in any output: passwords, keys and user names of URLs are left out', async () => {
    const out = allOutputs(await map());
    for (const s of SECRETS) assert.ok(!out.includes(s), `${s} is not in the output`);
    assert.ok(!out.includes('custos:'), 'no database user');
    assert.ok(!out.includes('auditor'), 'no database user');
  });

  test('GET and POST /admin/flows behind the admin token check', async () => {
    const app = Fastify();
    registerFlowRoutes(app, { flows: map }, (req) => {
      if (req.headers['x-custos-admin-token'] !== 'tok') throw new CustosError('ADMIN_TOKEN_INVALID');
    });
    try {
      const ok = await app.inject({
        method: 'GET',
        url: '/admin/flows',
        headers: { 'x-custos-admin-token': 'tok' },
      });
      assert.equal(ok.statusCode, 200);
      const body = ok.json<FlowMap>();
      assert.equal(body.covered, false);
      assert.ok(body.allowlist.some((e) => e.host === 'hooks.example.com'));
      const post = await app.inject({
        method: 'POST',
        url: '/admin/flows',
        headers: { 'x-custos-admin-token': 'tok' },
        payload: {},
      });
      assert.equal(post.statusCode, 200);
      const refused = await app.inject({ method: 'GET', url: '/admin/flows' });
      assert.notEqual(refused.statusCode, 200);
      assert.ok(!refused.body.includes('hooks.example.com'));
    } finally {
      await app.close();
    }
  });
});

describe('custos flows (storage opened directly)', () => {
  let storage: TestStorage;
  const populate = async (fn: (r: VendorRegistry) => Promise<void>) => {
    const db = storage.databaseUrl
      ? await PgDriver.open(storage.databaseUrl)
      : await PgliteDriver.open(path.join(storage.dataDir, 'resources'));
    const adb = storage.auditDatabaseUrl
      ? await PgDriver.open(storage.auditDatabaseUrl)
      : await PgliteDriver.open(path.join(storage.dataDir, 'audit'));
    try {
      await migrate(db, RESOURCE_MIGRATIONS, 'custos_migration');
      await prepareAuditSchema(adb, { production: false });
      await fn(new VendorRegistry({ db, audit: new AuditLog(adb) }));
    } finally {
      await db.close();
      await adb.close();
    }
  };
  before(async () => {
    storage = await createTestStorage();
  });
  after(async () => {
    await storage?.cleanup();
  });

  test('--json, --mermaid, --allowlist: exit 0 when covered, 1 once a BAA has expired; usage errors exit 2', async () => {
    const env = storage.env;
    await populate(async (r) => {
      const v = await r.addVendor({ name: 'CLI Covered', phiClass: 'full' });
      await r.addEndpoint({ vendor: v.vendorId, host: 'covered.example.com', port: 443, protocol: 'https' });
      await r.recordBaa({
        vendor: v.vendorId,
        executedAt: day(-3),
        expiresOn: day(200),
        documentSha256: SHA,
      });
    });
    const ok = await runCustos(['flows', '--json'], env);
    assert.equal(ok.code, 0, ok.stderr);
    assert.match(ok.stderr, /opening storage directly/);
    const m = JSON.parse(ok.stdout) as FlowMap;
    assert.equal(m.covered, true);
    assert.ok(m.allowlist.some((e) => e.host === 'covered.example.com' && e.allowedNow === 'full'));

    await populate(async (r) => {
      const v = await r.addVendor({ name: 'CLI Lapsed', phiClass: 'limited' });
      await r.addEndpoint({ vendor: v.vendorId, host: 'lapsed.example.com', port: 443, protocol: 'https' });
      await r.recordBaa({
        vendor: v.vendorId,
        executedAt: day(-500),
        expiresOn: day(-2),
        documentSha256: SHA,
      });
    });
    const bad = await runCustos(['flows', '--json'], env);
    assert.equal(bad.code, 1, bad.stderr);
    const m2 = JSON.parse(bad.stdout) as FlowMap; // exactly one JSON document
    assert.equal(m2.covered, false);
    assert.deepEqual(
      m2.flows.filter((f) => !f.covered).map((f) => m2.nodes.find((n) => n.id === f.to)?.label),
      ['CLI Lapsed'],
    );
    const mermaid = await runCustos(['flows', '--mermaid'], env);
    assert.equal(mermaid.code, 1);
    checkDrawings(m2);
    const parsed = parseMermaid(mermaid.stdout);
    assert.equal(parsed.linkStyles.size, 1);
    const list = await runCustos(['flows', '--allowlist'], env);
    assert.equal(list.code, 1);
    const rows = list.stdout
      .trimEnd()
      .split('\n')
      .filter((l) => !l.startsWith('#'))
      .map((l) => l.split('\t'));
    assert.deepEqual(
      rows.map((r) => [r[0], r[1], r[2], r[4], r[5]]),
      [
        ['covered.example.com', '443', 'https', 'full', 'full'],
        ['lapsed.example.com', '443', 'https', 'limited', 'deidentified'],
      ],
    );
    for (const args of [
      ['flows', '--json', '--dot'],
      ['flows', '--allowlist', '--mermaid'],
      ['flows', '--nonsense'],
    ]) {
      const r = await runCustos(args, env);
      assert.equal(r.code, 2, `${args.join(' ')}: ${r.stderr}`);
      assert.equal(r.stdout, '');
    }
    const help = await runCustos(['flows', '--help'], env);
    assert.equal(help.code, 0);
    assert.match(help.stdout, /--allowlist/);
  });

  test('with the server running: the same map through its admin API', async () => {
    const port = await freePort();
    const env = { ...storage.env, CUSTOS_PORT: String(port) };
    const server = spawn(process.execPath, [path.join(root, 'bin', 'custos.mjs'), 'serve'], {
      env: { ...process.env, ...env },
      cwd: root,
      stdio: ['ignore', 'ignore', 'ignore'],
    });
    try {
      const deadline = Date.now() + 60_000;
      for (;;) {
        try {
          if ((await fetch(`http://127.0.0.1:${port}/healthz`)).ok) break;
        } catch {
          /* not up yet */
        }
        if (Date.now() > deadline) throw new Error('server did not start');
        await new Promise((r) => setTimeout(r, 200));
      }
      const r = await runCustos(['flows', '--json'], env);
      assert.equal(r.code, 1, r.stderr);
      assert.match(r.stderr, /using the running server's admin API/);
      const m = JSON.parse(r.stdout) as FlowMap;
      assert.deepEqual(
        m.allowlist.map((e) => [e.host, e.allowedNow]),
        [
          ['covered.example.com', 'full'],
          ['lapsed.example.com', 'deidentified'],
        ],
      );
      assert.equal(m.flows.filter((f) => !f.covered).length, 1);
    } finally {
      server.kill('SIGTERM');
      await new Promise((r) => server.once('exit', r));
    }
  });

  test('the real command with passwords in the database URLs prints none of them (PostgreSQL)', async (t) => {
    if (!storage.databaseUrl || !storage.auditDatabaseUrl)
      return t.skip('needs CUSTOS_TEST_DATABASE_URL: embedded storage has no database URL');
    // The test server trusts its loopback clients, so the planted passwords are not checked by it.
    const withPassword = (url: string, pw: string) => {
      const u = new URL(url);
      u.password = pw;
      u.searchParams.set('application_name', 'flows-test');
      return u.href;
    };
    const env = {
      ...storage.env,
      CUSTOS_DATABASE_URL: withPassword(storage.databaseUrl, 's3cret-pw'),
      CUSTOS_AUDIT_DATABASE_URL: withPassword(storage.auditDatabaseUrl, 'au-secret'),
    };
    for (const args of [['flows', '--json'], ['flows'], ['flows', '--dot']]) {
      const r = await runCustos(args, env);
      assert.ok(r.code === 0 || r.code === 1, `${args.join(' ')}: ${r.stderr}`);
      for (const s of ['s3cret-pw', 'au-secret']) assert.ok(!(r.stdout + r.stderr).includes(s), s);
      assert.match(r.stdout, /PostgreSQL 127\.0\.0\.1:5432\/custos_test_/);
    }
  });
});

import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { isCustosError } from '../src/kernel/errors.ts';
import { dataPaths } from '../src/server.ts';
import { ADMIN_TOKEN_HEADER } from '../src/admin/admin-routes.ts';
import { parseSignedAt } from '../src/admin/project-baa.ts';
import { startHarness, type Harness } from './support/harness.ts';
import { createTestStorage, type TestStorage } from './support/storage.ts';
import { runCustos } from './support/custos-cli.ts';

// Projects and BAAs (docs/phi-boundary.md): a project is production only with a recorded BAA;
// recording one is audited and promotes the project; bad input writes nothing.

const SHA = createHash('sha256').update('signed BAA (synthetic test document)').digest('hex');
const good = (projectId: string) => ({
  projectId,
  counterparty: 'Example Clinic LLC',
  signedBy: 'Dana Roe',
  signedAt: '2024-03-01',
  services: ['fhir', 'mllp'],
  documentSha256: SHA,
});

let h: Harness;
before(async () => {
  h = await startHarness();
});
after(async () => {
  await h?.close();
});

async function auditCodes(projectId: string): Promise<string[]> {
  const audit = h.server.core.audit;
  const rows = await audit.read(0, await audit.size());
  return rows
    .map((r) => JSON.parse(r.entry.toString('utf8')) as { projectId?: string; action: string; code?: string })
    .filter((e) => e.projectId === projectId && e.action === 'admin')
    .map((e) => e.code!);
}

async function baaCount(projectId: string): Promise<number> {
  const r = await h.server.core.resourceDb.query<{ n: number }>(
    'SELECT count(*)::int AS n FROM project_baa WHERE project_id = $1',
    [projectId],
  );
  return r.rows[0]!.n;
}

describe('project create and project baa (admin service)', () => {
  test('--production creates a sandbox that a recorded BAA promotes; both audited; a second BAA is added', async () => {
    const admin = h.server.core.admin;
    const p = await admin.createProject({ name: 'Clinic app', production: true });
    assert.equal(p.kind, 'sandbox');
    assert.equal(p.productionRequested, true);
    assert.deepEqual(await auditCodes(p.projectId), ['project.created']);

    const r = await admin.recordBaa({ ...good(p.projectId), recordedBy: 'ops-account' });
    assert.equal(r.kind, 'production');
    assert.equal(r.promoted, true);
    assert.equal(r.documentSha256, SHA);
    assert.deepEqual(r.services, ['fhir', 'mllp']);
    assert.deepEqual(await auditCodes(p.projectId), [
      'project.created',
      'project.baa_recorded',
      'project.promoted',
    ]);

    const again = await admin.recordBaa({ ...good(p.projectId), signedAt: '2025-01-02T10:00:00+01:00' });
    assert.equal(again.promoted, false, 'already production');
    assert.equal(again.signedAt, '2025-01-02T09:00:00.000Z');
    const shown = await admin.showProject(p.projectId);
    assert.equal(shown.kind, 'production');
    assert.equal(shown.productionRequested, false);
    assert.deepEqual(
      shown.baas.map((b) => [b.counterparty, b.signedBy, b.signedAt, b.documentSha256, b.recordedBy]),
      [
        ['Example Clinic LLC', 'Dana Roe', '2024-03-01', SHA, 'ops-account'],
        ['Example Clinic LLC', 'Dana Roe', '2025-01-02T09:00:00.000Z', SHA, 'installation-admin'],
      ],
    );
  });

  test('bad input is refused naming the field, never the value, and writes nothing', async () => {
    const admin = h.server.core.admin;
    const p = await admin.createProject({ name: 'Untouched sandbox' });
    const tomorrow = new Date(Date.now() + 2 * 86_400_000).toISOString().slice(0, 10);
    const cases: [string, Record<string, unknown>, string][] = [
      ['unreadable date', { signedAt: 'next tuesday' }, 'signedAt'],
      ['not a calendar date', { signedAt: '2024-02-30' }, 'signedAt'],
      ['future date', { signedAt: tomorrow }, 'signedAt'],
      ['before HIPAA', { signedAt: '1990-01-01' }, 'signedAt'],
      ['unknown service', { services: ['fhir', 'carrier-pigeon'] }, 'services'],
      ['no service', { services: [] }, 'services'],
      ['no document', { documentSha256: undefined }, 'documentSha256'],
      ['not a SHA-256', { documentSha256: 'abc' }, 'documentSha256'],
      ['no counterparty', { counterparty: '  ' }, 'counterparty'],
      ['no signatory', { signedBy: undefined }, 'signedBy'],
    ];
    for (const [what, change, field] of cases) {
      await assert.rejects(
        admin.recordBaa({ ...good(p.projectId), ...change }),
        (e: unknown) => {
          assert.ok(isCustosError(e), what);
          assert.equal(e.code, 'BAA_INVALID', what);
          assert.deepEqual(
            e.details.map((d) => d.expression),
            [field],
            what,
          );
          assert.ok(!e.details.some((d) => d.diagnostics?.includes('carrier-pigeon')), 'no value echoed');
          return true;
        },
        what,
      );
    }
    await assert.rejects(admin.recordBaa(good('no-such-project')), (e: unknown) => {
      assert.ok(isCustosError(e) && e.code === 'PROJECT_NOT_FOUND');
      return true;
    });
    assert.equal(await baaCount(p.projectId), 0);
    assert.equal((await admin.showProject(p.projectId)).kind, 'sandbox');
    assert.deepEqual(await auditCodes(p.projectId), ['project.created'], 'no BAA or promotion audited');
    await assert.rejects(
      admin.createProject({ name: ' ' }),
      (e: unknown) => isCustosError(e) && e.code === 'BAD_REQUEST',
    );
  });

  test('the database refuses a production project without a BAA, whatever writes it', async () => {
    const p = await h.server.core.admin.createProject({ name: 'Sneaky' });
    await assert.rejects(
      h.server.core.resourceDb.query(`UPDATE project SET kind = 'production' WHERE id = $1`, [p.projectId]),
    );
    await assert.rejects(
      h.server.core.resourceDb.query(
        `INSERT INTO project (id, name, kind) VALUES ('direct-prod', 'x', 'production')`,
      ),
    );
  });

  test('signature dates: a date is accepted up to "today" anywhere on Earth', () => {
    const now = new Date('2025-06-01T12:00:00Z');
    assert.deepEqual(parseSignedAt('2025-06-02', now), { value: '2025-06-02' });
    assert.ok('reason' in parseSignedAt('2025-06-03', now));
    assert.ok('reason' in parseSignedAt('2025-06-01T12:30:00Z', now));
    assert.ok('reason' in parseSignedAt('2025-06-01T12:00:00', now), 'a date-time needs a zone');
  });
});

describe('the admin API and the CLI', () => {
  const api = async (p: string, body: unknown, token?: string) => {
    const adminToken = token ?? fs.readFileSync(dataPaths(h.config.dataDir).adminToken, 'utf8').trim();
    const res = await fetch(`${h.server.url}${p}`, {
      method: 'POST',
      headers: { 'content-type': 'application/json', [ADMIN_TOKEN_HEADER]: adminToken },
      body: JSON.stringify(body),
    });
    return { status: res.status, json: (await res.json()) as any };
  };

  test('POST /admin/projects and /admin/projects/baa (document hashed, not kept); bad input is a 400', async () => {
    const created = await api('/admin/projects', { name: 'API project', production: true });
    assert.equal(created.status, 200);
    const projectId = created.json.projectId as string;
    const document = Buffer.from('%PDF-1.7 synthetic BAA');
    const bad = await api('/admin/projects/baa', {
      ...good(projectId),
      documentSha256: undefined,
      documentBase64: document.toString('base64'),
      services: ['fhir', 'telepathy'],
    });
    assert.equal(bad.status, 400);
    assert.equal(bad.json.issue[0].details.coding[0].code, 'BAA_INVALID');
    assert.deepEqual(bad.json.issue[0].expression, ['services']);
    assert.equal(await baaCount(projectId), 0);
    const unknown = await api('/admin/projects/baa', good('nope'));
    assert.equal(unknown.status, 404);
    const denied = await api('/admin/projects/baa', good(projectId), 'wrong-token');
    assert.equal(denied.status, 401);
    assert.equal(await baaCount(projectId), 0);

    const ok = await api('/admin/projects/baa', {
      ...good(projectId),
      documentSha256: undefined,
      documentBase64: document.toString('base64'),
    });
    assert.equal(ok.status, 200);
    assert.equal(ok.json.documentSha256, createHash('sha256').update(document).digest('hex'));
    assert.equal(ok.json.promoted, true);
    const shown = await api('/admin/projects/show', { projectId });
    assert.equal(shown.json.kind, 'production');
  });

  test('custos project create / baa / show through the running server, with the documented exits', async () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'custos-baa-'));
    const doc = path.join(dir, 'baa.pdf');
    fs.writeFileSync(doc, 'synthetic signed BAA');
    try {
      const env = h.storage.env;
      const created = await runCustos(
        ['project', 'create', '--name', 'CLI project', '--production', '--json'],
        env,
      );
      assert.equal(created.code, 0, created.stderr);
      assert.match(created.stderr, /admin API/);
      const p = JSON.parse(created.stdout) as {
        projectId: string;
        kind: string;
        productionRequested: boolean;
      };
      assert.deepEqual([p.kind, p.productionRequested], ['sandbox', true]);

      const baa = (extra: string[]) =>
        runCustos(
          [
            'project',
            'baa',
            '--project',
            p.projectId,
            '--counterparty',
            'Example Clinic LLC',
            '--signed-by',
            'Dana Roe',
            '--services',
            'fhir,mllp',
            '--json',
            ...extra,
          ],
          env,
        );
      const missing = await baa(['--signed-at', '2024-03-01', '--document', path.join(dir, 'absent.pdf')]);
      assert.equal(missing.code, 2);
      assert.match(missing.stderr, /--document: cannot read that file/);
      const future = await baa(['--signed-at', '2999-01-01', '--document', doc]);
      assert.equal(future.code, 2);
      assert.match(future.stderr, /in the future/);
      assert.equal(await baaCount(p.projectId), 0, 'nothing written');

      const recorded = await baa(['--signed-at', '2024-03-01', '--document', doc]);
      assert.equal(recorded.code, 0, recorded.stderr);
      const r = JSON.parse(recorded.stdout) as { promoted: boolean; documentSha256: string; kind: string };
      assert.equal(r.promoted, true);
      assert.equal(r.kind, 'production');
      assert.equal(r.documentSha256, createHash('sha256').update(fs.readFileSync(doc)).digest('hex'));

      const shown = await runCustos(['project', 'show', '--project', p.projectId], env);
      assert.equal(shown.code, 0, shown.stderr);
      assert.match(shown.stdout, /kind: +production/);
      assert.match(shown.stdout, /Example Clinic LLC, signed by Dana Roe at 2024-03-01; services fhir, mllp/);
    } finally {
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });
});

describe('custos project with storage opened directly', () => {
  let storage: TestStorage;
  before(async () => {
    storage = await createTestStorage();
  });
  after(async () => {
    await storage?.cleanup();
  });

  test('create, then baa promotes; an unknown project is exit 2', async () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'custos-baa-'));
    const doc = path.join(dir, 'baa.txt');
    fs.writeFileSync(doc, 'synthetic signed BAA');
    try {
      const created = await runCustos(['project', 'create', '--name', 'Direct', '--json'], storage.env);
      assert.equal(created.code, 0, created.stderr);
      assert.match(created.stderr, /opening storage directly/);
      const { projectId } = JSON.parse(created.stdout) as { projectId: string };
      const args = (project: string) => [
        'project',
        'baa',
        '--project',
        project,
        '--counterparty',
        'Example Clinic LLC',
        '--signed-by',
        'Dana Roe',
        '--signed-at',
        '2024-03-01',
        '--services',
        'fhir',
        '--document',
        doc,
      ];
      const unknown = await runCustos(args('no-such-project'), storage.env);
      assert.equal(unknown.code, 2);
      assert.match(unknown.stderr, /No such project/);
      const ok = await runCustos(args(projectId), storage.env);
      assert.equal(ok.code, 0, ok.stderr);
      assert.match(ok.stdout, /now production/);
    } finally {
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });
});

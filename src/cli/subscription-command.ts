import type { Command } from 'commander';
import { DeadLetters, type AdminDelivery } from '../subscriptions/subscription-queue.ts';
import { type CommandDeps } from './command-deps.ts';

export type SubscriptionCommandDeps = CommandDeps;

function deliveryText(d: AdminDelivery): string {
  return (
    `${d.id}  subscription ${d.subscriptionId}  ${d.resourceType}/${d.resourceId}/_history/${d.versionId}  ` +
    `project ${d.projectId}  attempts ${d.attempts}  last error ${d.lastError ?? '-'}  ` +
    `dead since ${d.deadAt ?? '-'}${d.replays ? `  replayed ${d.replays}×` : ''}`
  );
}

/**
 * `custos subscription dead-letters [--project P] [--subscription S] [--limit N] [--json]` and
 * `custos subscription replay --id ID`: the notifications of rest-hook subscriptions that ran out
 * of attempts, and putting one back in the queue (docs/phi-boundary.md, "Subscriptions"). Through
 * the running server's admin API, or on storage opened directly when no server runs.
 */
export function subscriptionCommand(program: Command, d: SubscriptionCommandDeps): void {
  const sub = program
    .command('subscription')
    .description('FHIR rest-hook subscriptions: dead letters and replay');
  sub
    .command('dead-letters')
    .description('List the notifications that ran out of attempts (newest first); never resource content')
    .option('--project <id>', 'only this project')
    .option('--subscription <id>', 'only this Subscription')
    .option('--limit <n>', 'at most this many (1–1000, default 100)')
    .option('--json', 'print one JSON document')
    .action(async (opts: { project?: string; subscription?: string; limit?: string; json?: boolean }) => {
      let limit: number | undefined;
      if (opts.limit !== undefined) {
        limit = Number(opts.limit);
        if (!Number.isInteger(limit) || limit < 1 || limit > 1000)
          throw d.usage('custos: --limit must be a whole number from 1 to 1000');
      }
      const body = { projectId: opts.project, subscriptionId: opts.subscription, limit };
      const r = await d.withBackend<{ deadLetters: AdminDelivery[] }>(
        d.config(),
        async (call) =>
          (await call('/admin/subscriptions/dead-letters', body)) as { deadLetters: AdminDelivery[] },
        (core) => new DeadLetters({ db: core.resourceDb, audit: core.audit }).list(body),
      );
      d.print(
        opts.json === true,
        r,
        r.deadLetters.length === 0
          ? 'no dead letters'
          : [`${r.deadLetters.length} dead letter(s):`, ...r.deadLetters.map(deliveryText)].join('\n'),
      );
    });
  sub
    .command('replay')
    .description('Queue a dead letter again, due now, with its attempts reset and the same notification id')
    .requiredOption('--id <id>', 'the dead letter (notification) id, from custos subscription dead-letters')
    .option('--json', 'print one JSON document')
    .action(async (opts: { id: string; json?: boolean }) => {
      const r = await d.withBackend<{ replayed: AdminDelivery }>(
        d.config(),
        async (call) =>
          (await call('/admin/subscriptions/replay', { id: opts.id })) as { replayed: AdminDelivery },
        async (core) => ({
          replayed: await new DeadLetters({ db: core.resourceDb, audit: core.audit }).replay(opts.id),
        }),
      );
      d.print(
        opts.json === true,
        r,
        `replayed ${r.replayed.id}: queued again for subscription ${r.replayed.subscriptionId}` +
          ' (delivered by the server once it runs)',
      );
    });
}

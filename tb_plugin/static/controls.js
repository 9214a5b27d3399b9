// The run page's controls: pause, resume, stop (after a confirmation) and save a checkpoint.
// Each command is sent, then the trainer's acknowledgement is awaited and shown; a checkpoint
// that was written is offered for download.

import {postControl, waitForAck, checkpointUrl} from './model.js';
import {h, setText, confirmDialog} from './views.js';

export class Controls {
  /**
   * @param {string} run
   * @param {import('./model.js').Config} config
   * @param {function(): boolean} closed whether the page has been left (late answers are dropped)
   */
  constructor(run, config, closed) {
    Object.assign(this, {run, config, closed, busy: false, state: null, resumeHint: null});
    this.el = config.read_only ? h('div', {class: 'muted', testid: 'controls-readonly',
      text: 'Read-only mode (--tbhealth_read_only): pause, resume, stop and checkpoint are disabled here.'}) : this.build();
  }

  build() {
    this.pause = h('button', {class: 'btn tone-warn', testid: 'btn-pause', text: 'Pause', onClick: () => this.send('pause')});
    this.resume = h('button', {class: 'btn tone-warn', testid: 'btn-resume', text: 'Resume', onClick: () => this.send('resume')});
    this.stop = h('button', {class: 'btn tone-bad', testid: 'btn-stop', text: 'Stop', onClick: () => this.confirmStop()});
    this.save = h('button', {class: 'btn tone-accent', testid: 'btn-checkpoint', text: 'Save checkpoint', onClick: () => this.send('checkpoint')});
    this.outcome = h('div', {class: 'control-outcome', testid: 'control-outcome', role: 'status'});
    this.download = h('div', {class: 'checkpoint-download', testid: 'checkpoint-download'});
    return h('div', {class: 'controls', testid: 'controls'},
        h('div', {class: 'buttons'}, this.pause, this.resume, this.stop, this.save), this.outcome, this.download);
  }

  /** Enable the buttons that make sense in the run's `state` (null: unknown yet); `resumeHint` is
   * the status's command that continues the run, quoted in the stop confirmation. */
  update(state, resumeHint = null) {
    this.state = state;
    this.resumeHint = resumeHint;
    if (this.config.read_only || state === null) return;
    const live = this.config.states.live.includes(state);
    this.pause.hidden = state === 'paused';
    this.resume.hidden = state !== 'paused';
    for (const b of [this.pause, this.resume, this.stop, this.save]) {
      b.disabled = this.busy || !live;
      b.title = live ? '' : `The run is ${state}: controls work only on a live run.`;
    }
  }

  async confirmStop() {
    const ok = await confirmDialog(document.body, {
      title: `Stop run ${this.run}?`,
      body: `The trainer saves a checkpoint and ends training. This cannot be undone (later: ${this.resumeHint ?? 'continue it with tbhealth train --resume'}).`,
      confirmText: 'Stop run', tone: 'bad', testid: 'confirm-stop',
    });
    if (ok) await this.send('stop');
  }

  /** Send a command, wait for the trainer's acknowledgement, show the outcome. */
  async send(command) {
    this.busy = true;
    this.update(this.state);
    this.outcome.className = 'control-outcome pending';
    setText(this.outcome, `${command}: sent, waiting for the trainer…`);
    try {
      const sent = await postControl(this.run, command);
      if (sent.error) {
        this.outcome.className = 'control-outcome tone-bad';
        setText(this.outcome, `${command} refused: ${sent.error}`);
        return;
      }
      const ack = await waitForAck(this.run, sent.id);
      if (this.closed()) return;
      const done = ack.status === 'done';
      this.outcome.className = `control-outcome ${done ? 'tone-good' : 'tone-bad'}`;
      this.outcome.dataset.status = ack.status;
      setText(this.outcome, `${command} ${ack.status}${ack.detail ? ': ' + ack.detail : ''}`);
      if (done && ack.checkpoint) {
        this.download.replaceChildren(h('a', {href: checkpointUrl(this.run, ack.checkpoint), download: ack.checkpoint,
          testid: 'checkpoint-link', class: 'btn tone-accent', text: `Download ${ack.checkpoint}`}));
      }
    } finally {
      this.busy = false;
      this.update(this.state);
    }
  }
}

{{/* Names and labels shared by every template. */}}
{{- define "cascade.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "cascade.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "cascade.labels" -}}
app.kubernetes.io/name: {{ include "cascade.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "cascade.selectorLabels" -}}
app.kubernetes.io/name: {{ include "cascade.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "cascade.image" -}}
{{ printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end -}}

{{- define "cascade.apiKeySecret" -}}
{{- .Values.apiKey.existingSecret | default (printf "%s-api-key" (include "cascade.fullname" .)) -}}
{{- end -}}

{{- define "cascade.modelsClaim" -}}
{{- .Values.models.pvc.existingClaim | default (printf "%s-models" (include "cascade.fullname" .)) -}}
{{- end -}}

{{/* The queue URL the gateway and the re-distillation job share. */}}
{{- define "cascade.queueUrl" -}}
{{- if eq .Values.queue.backend "redis" -}}
{{- if .Values.queue.redis.deploy -}}
{{- printf "redis://%s-redis:6379/0" (include "cascade.fullname" .) -}}
{{- else -}}
{{- required "queue.redis.url is required when queue.backend is redis and queue.redis.deploy is false" .Values.queue.redis.url -}}
{{- end -}}
{{- else -}}
sqlite:////data/queue/queue.db
{{- end -}}
{{- end -}}

{{/* Pod and container security: non-root, no privilege escalation, no capabilities. */}}
{{- define "cascade.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .Values.securityContext.runAsUser }}
runAsGroup: {{ .Values.securityContext.runAsGroup }}
fsGroup: {{ .Values.securityContext.runAsGroup }}
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "cascade.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: {{ .Values.securityContext.readOnlyRootFilesystem }}
capabilities:
  drop: ["ALL"]
{{- end -}}

{{/* Environment every Cascade container gets. */}}
{{- define "cascade.env" -}}
- name: CASCADE_HOME
  value: /data/models
- name: CASCADE_QUEUE_URL
  value: {{ include "cascade.queueUrl" . | quote }}
- name: CASCADE_API_KEY_FILE
  value: /etc/cascade/api-key
- name: HF_HUB_OFFLINE
  value: "1"
- name: TRANSFORMERS_OFFLINE
  value: "1"
{{- end -}}

{{/* Volumes of a pod: the models, the API key, /tmp, and (only where "queue" is true) the SQLite queue.
Ray workers never get the queue volume: it is ReadWriteOnce, and SQLite holds one node. */}}
{{- define "cascade.volumeMounts" -}}
- name: models
  mountPath: /data/models
- name: api-key
  mountPath: /etc/cascade
  readOnly: true
- name: tmp
  mountPath: /tmp
{{- if and .queue (eq .root.Values.queue.backend "sqlite") }}
- name: queue
  mountPath: /data/queue
{{- end }}
{{- end -}}

{{- define "cascade.volumes" -}}
- name: models
  persistentVolumeClaim:
    claimName: {{ include "cascade.modelsClaim" .root }}
- name: api-key
  secret:
    secretName: {{ include "cascade.apiKeySecret" .root }}
    items:
      - key: api-key
        path: api-key
- name: tmp
  emptyDir: {}
{{- if and .queue (eq .root.Values.queue.backend "sqlite") }}
- name: queue
  persistentVolumeClaim:
    claimName: {{ include "cascade.fullname" .root }}-queue
{{- end }}
{{- end -}}

{{/* Before Ray starts: the bundle copied from S3-compatible storage, or (models.source build) a wait until the
models Job has made the registry current. */}}
{{- define "cascade.modelsInit" -}}
{{- if eq .Values.models.source "s3" }}
initContainers:
  - name: fetch-models
    image: {{ .Values.models.s3.image }}
    command: ["sh", "-c"]
    args:
      - aws s3 sync {{ required "models.s3.url is required when models.source is s3" .Values.models.s3.url | quote }} /data/models/registry {{- if .Values.models.s3.endpoint }} --endpoint-url {{ .Values.models.s3.endpoint | quote }}{{ end }}
    envFrom:
      - secretRef:
          name: {{ required "models.s3.credentialsSecret is required when models.source is s3" .Values.models.s3.credentialsSecret }}
    env:
      - name: HOME
        value: /tmp
    securityContext:
      {{- include "cascade.containerSecurityContext" . | nindent 6 }}
    volumeMounts:
      - name: models
        mountPath: /data/models
      - name: tmp
        mountPath: /tmp
{{- else if eq .Values.models.source "build" }}
initContainers:
  - name: wait-for-models
    image: {{ include "cascade.image" . }}
    imagePullPolicy: {{ .Values.image.pullPolicy }}
    command: ["sh", "-c", "until [ -s /data/models/registry/current ]; do echo waiting for the models Job; sleep 10; done"]
    securityContext:
      {{- include "cascade.containerSecurityContext" . | nindent 6 }}
    volumeMounts:
      - name: models
        mountPath: /data/models
        readOnly: true
{{- end }}
{{- end -}}

{{/* One Ray worker group: CPU workers, or GPU workers ("gpus" > 0: nvidia.com/gpu limits, their own
nodeSelector and tolerations). "ray_resources" become Ray custom resources (rayStartParams resources), which
serve.<deployment>.ray_actor_options.resources can pin replicas to. */}}
{{- define "cascade.workerGroup" -}}
{{- $root := .root -}}
{{- $resources := deepCopy .group.resources -}}
{{- if gt (int .gpus) 0 -}}
{{- $_ := set $resources "limits" (merge (dict "nvidia.com/gpu" (int .gpus)) ($resources.limits | default dict)) -}}
{{- end -}}
- groupName: {{ .name }}
  replicas: {{ .group.replicas }}
  minReplicas: {{ .group.minReplicas }}
  maxReplicas: {{ max .group.maxReplicas .group.replicas }}
  rayStartParams:
    metrics-export-port: {{ $root.Values.ray.metricsPort | quote }}
    {{- with .group.rayResources }}
    resources: {{ toJson . | quote | squote }}
    {{- end }}
  template:
    metadata:
      labels:
        {{- include "cascade.selectorLabels" $root | nindent 8 }}
        cascade.io/role: worker
        cascade.io/group: {{ .name }}
    spec:
      securityContext:
        {{- include "cascade.podSecurityContext" $root | nindent 8 }}
      {{- with $root.Values.imagePullSecrets }}
      imagePullSecrets:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- include "cascade.modelsInit" $root | nindent 6 }}
      containers:
        - name: ray-worker
          image: {{ include "cascade.image" $root }}
          imagePullPolicy: {{ $root.Values.image.pullPolicy }}
          ports:
            - {containerPort: {{ int $root.Values.serve.http_options.port }}, name: serve}
            - {containerPort: {{ int $root.Values.ray.metricsPort }}, name: metrics}
          env:
            {{- include "cascade.env" $root | nindent 12 }}
            {{- include "cascade.fastPathEnv" $root | nindent 12 }}
          resources:
            {{- toYaml $resources | nindent 12 }}
          securityContext:
            {{- include "cascade.containerSecurityContext" $root | nindent 12 }}
          volumeMounts:
            {{- include "cascade.volumeMounts" (dict "root" $root "queue" false) | nindent 12 }}
      volumes:
        {{- include "cascade.volumes" (dict "root" $root "queue" false) | nindent 8 }}
      {{- with .nodeSelector }}
      nodeSelector:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with .tolerations }}
      tolerations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $root.Values.affinity }}
      affinity:
        {{- toYaml . | nindent 8 }}
      {{- end }}
{{- end -}}

{{/* A Serve deployment from serve.<name>: Serve's own fields, with autoscaling_config in place of
num_replicas when autoscaling.enabled (Serve refuses both). */}}
{{- define "cascade.serveDeployment" -}}
{{- $deployment := omit (deepCopy .values) "autoscaling" -}}
{{- if .values.autoscaling.enabled -}}
{{- $deployment = omit $deployment "num_replicas" -}}
{{- $_ := set $deployment "autoscaling_config" (omit .values.autoscaling "enabled") -}}
{{- end -}}
{{- $_ := set $deployment "name" .name -}}
{{- toYaml $deployment -}}
{{- end -}}

{{/* Serve's fast path (HAProxy ingress, throughput-optimised), on every Ray node. */}}
{{- define "cascade.fastPathEnv" -}}
{{- if .Values.serve.fastPath }}
- name: RAY_SERVE_ENABLE_HA_PROXY
  value: "1"
- name: RAY_SERVE_THROUGHPUT_OPTIMIZED
  value: "1"
- name: RAY_SERVE_HAPROXY_RETRY_ON
  value: "conn-failure empty-response junk-response"
- name: RAY_SERVE_HAPROXY_RETRIES
  value: "2"
- name: RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S
  value: "30"
- name: RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S
  value: "30"
{{- /* serve.process_limits as HAProxy reads them at start (serving/settings.py ProcessLimits.haproxy_env;
a unit test renders both and compares). */}}
{{- with .Values.serve.process_limits }}
- name: RAY_SERVE_HAPROXY_TIMEOUT_CLIENT_S
  value: {{ int .client_timeout_s | quote }}
- name: RAY_SERVE_HAPROXY_TIMEOUT_SERVER_S
  value: {{ add (ceil .request_timeout_s) 2 | quote }}
- name: RAY_SERVE_HAPROXY_TUNE_BUFSIZE
  value: {{ add .max_header_bytes 1024 | quote }}
- name: RAY_SERVE_HAPROXY_MAXCONN
  value: {{ int .max_connections | quote }}
{{- end }}
{{- end }}
{{- end -}}
